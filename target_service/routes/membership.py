"""Membership challenges over HTTP: the admin opens one for a model and a client; that client
reads the candidates and submits one score per candidate, once. See ``target_service.membership``."""

from __future__ import annotations

from fastapi import APIRouter, status

from mlcore.wire import (
    MembershipChallenge,
    MembershipChallengeCreate,
    MembershipChallengeView,
    MembershipResult,
    MembershipScores,
    encode_tensor,
)
from target_service.deps import AdminDep, ClientDep, ServiceDep
from target_service.errors import BODY_STATUSES, documented
from target_service.membership import candidate_images, open_challenge, score_challenge

router = APIRouter(prefix="/v1/membership-challenges", responses=documented(401, 404, 422))
admin_router = APIRouter(prefix="/v1/admin/membership-challenges", responses=documented(401, 403))


def _admin_view(challenge: dict) -> MembershipChallengeView:
    return MembershipChallengeView(
        **{key: challenge[key] for key in MembershipChallengeView.model_fields if key != "result"},
        result=challenge["result"],
    )


@admin_router.post(
    "", status_code=status.HTTP_201_CREATED, responses=documented(*BODY_STATUSES, 404)
)
def create_challenge(
    body: MembershipChallengeCreate, service: ServiceDep, _: AdminDep
) -> MembershipChallengeView:
    """Open a challenge: ``n`` balanced candidates (members from the model's training set,
    non-members from the held-out ``test`` split), drawn with ``seed``. 404 for an unknown
    client or a model that client may not use; 422 for an odd ``n``, one larger than the data
    allows, or a model whose members the service does not know."""
    return _admin_view(
        open_challenge(
            service, model=body.model, client_id=body.client_id, n=body.n, seed=body.seed
        )
    )


@admin_router.get("")
def list_challenges(service: ServiceDep, _: AdminDep) -> list[MembershipChallengeView]:
    """Every challenge and its result (never its ground truth), oldest first."""
    return [_admin_view(row) for row in service.store.list_membership_challenges()]


@admin_router.get("/{challenge_id}", responses=documented(404, 422))
def get_any_challenge(
    challenge_id: str, service: ServiceDep, _: AdminDep
) -> MembershipChallengeView:
    return _admin_view(service.store.get_membership_challenge(challenge_id))


@router.get("/{challenge_id}")
def get_challenge(challenge_id: str, client: ClientDep, service: ServiceDep) -> MembershipChallenge:
    """The candidates of a challenge opened for you (another client's is 404): images and class
    labels in a random order, and your remaining query budget. Reading them costs nothing."""
    challenge = service.store.get_membership_challenge(challenge_id, client.client_id)
    images, labels = candidate_images(service, challenge)
    return MembershipChallenge(
        challenge_id=challenge["challenge_id"],
        model=challenge["model"],
        n=challenge["n"],
        images=encode_tensor(images),
        labels=labels,
        queries_remaining=client.remaining,
        submitted=challenge["result"] is not None,
    )


@router.post("/{challenge_id}/scores", responses=documented(*BODY_STATUSES, 409))
def submit_scores(
    challenge_id: str, body: MembershipScores, client: ClientDep, service: ServiceDep
) -> MembershipResult:
    """One finite score per candidate, higher = member, once (a second submission is 409).
    The answer: AUC, best balanced accuracy, TPR at 1% and 0.1% FPR, and the ROC curve on a
    fixed FPR grid. Nothing is charged."""
    challenge = service.store.get_membership_challenge(challenge_id, client.client_id)
    return MembershipResult(**score_challenge(service, challenge, body.scores))
