"""Admin routes (separate admin token): clients, budgets and the defence-evaluation view."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from target_service.deps import AdminDep, ServiceDep
from target_service.errors import BODY_STATUSES, documented
from target_service.routes.datasets import AdminDatasetView, remove_dataset
from target_service.routes.training import AdminJobView, admin_job_view
from target_service.service import TargetService
from target_service.state import ORG_PATTERN, Client

router = APIRouter(prefix="/v1/admin", responses=documented(401, 403))


class ClientCreate(BaseModel):
    """Strict: ``"budget": "100"`` or ``true`` is refused, not read as a number."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=200, description="Printable text.")
    budget: int = Field(ge=0, le=10**12)
    training_quota: int = Field(
        default=0, ge=0, le=10**15, description="Image-epochs of training; 0 = may not train."
    )
    org: str | None = Field(
        default=None,
        pattern=ORG_PATTERN,
        description="Its organisation: TARGET_DETECTION_GROUPS=org watches an org's clients "
        "together. 1-64 letters, digits, '_', '.' or '-'.",
    )

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str) -> str:
        if not name.isprintable():
            raise ValueError("name must be printable text (no control characters or newlines)")
        return name


class ClientCreated(BaseModel):
    client_id: str
    name: str
    api_key: str = Field(description="Shown once; the service keeps only its hash.")
    budget: int
    training_quota: int
    org: str | None = None


class ClientView(BaseModel):
    client_id: str
    name: str
    org: str | None = None
    budget: int
    queries_used: int
    queries_remaining: int
    training_quota: int = Field(description="Image-epochs this client may train.")
    training_used: int = Field(description="Image-epochs reserved by its jobs, net of refunds.")
    revoked: bool
    created_at: float


class DetectorView(BaseModel):
    first_alarm_at: int | None = Field(description="1-based query index of the first alarm.")
    statistic: float | None
    threshold: float
    queries_seen: int
    status: Literal["ok", "error"] = Field(
        description="'error': the detector raised and sees no queries until it is rebuilt from "
        "the query log, on the client's next request or at restart."
    )
    message: str | None = Field(description="The detector's error, when status is 'error'.")
    stored: int | None = Field(None, description="PRADA: queries held in its growing sets.")
    max_stored: int | None = Field(None, description="PRADA: the cap on ``stored``.")


class InputDefenseView(BaseModel):
    """One client's stream through a model's input defence (``TARGET_INPUT_DEFENSES``)."""

    kind: str
    mode: Literal["log", "sanitized", "framework"]
    images: int = Field(description="Images screened (charged) so far.")
    flagged: int = Field(description="Images whose score was over the threshold.")
    rejected: int = Field(
        description="Images refused (label null): the flagged ones in framework mode, else 0."
    )
    recent_images: int = Field(description="Images in the alarm window (at most alarm_window).")
    recent_flagged: int = Field(description="Flagged images among them.")
    statistic: float = Field(description="recent_flagged / alarm_window.")
    threshold: float = Field(description="The alarm fires when statistic reaches this share.")
    alarm_window: int
    first_alarm_at: int | None = Field(description="1-based image index of the alarm.")
    score: str = Field(description="The per-image score, e.g. kl: KL(parent || sanitised).")
    score_threshold: float = Field(description="An image is flagged when its score is above this.")
    recent_score_mean: float | None = Field(description="Mean score over the alarm window.")
    recent_score_max: float | None = Field(description="Highest score over the alarm window.")


class TrainingLedgerEntry(BaseModel):
    """A job's reservation of image-epochs (positive) or a refund of what it did not run."""

    job_id: str
    image_epochs: int
    reason: str
    created_at: float


class ClientDefenceView(ClientView):
    """The defence-evaluation view: ``detectors`` is for the model this client queried most;
    ``detectors_by_model`` has every model it queried."""

    detectors: dict[str, DetectorView]
    detectors_by_model: dict[str, dict[str, DetectorView]]
    input_defenses: dict[str, InputDefenseView] = Field(
        description="Per model this client queried that has an input defence."
    )
    blocked_on: list[str]
    training_ledger: list[TrainingLedgerEntry]


class AlarmView(BaseModel):
    """A detector's first alarm on a stream, or (``status: "error"``) a detector in error there:
    then ``query_index`` is the last query of the batch it first failed on and ``message`` its
    latest error."""

    client_id: str
    client_name: str
    model: str
    detector: str
    status: Literal["alarm", "error"] = "alarm"
    stream: str | None = Field(
        None,
        description="A group's alarm (TARGET_DETECTION_GROUPS): 'org:<org>' or 'all'; then "
        "query_index counts the group's union of queries and the client is the one whose query "
        "raised it.",
    )
    query_index: int
    statistic: float | None = None
    threshold: float | None = None
    message: str | None = None
    created_at: float


def _view(client: Client, service: TargetService, orgs: dict[str, str] | None = None) -> ClientView:
    quota, used = service.store.training_usage(client.client_id)
    orgs = service.store.client_orgs() if orgs is None else orgs
    return ClientView(
        org=orgs.get(client.client_id),
        training_quota=quota,
        training_used=used,
        client_id=client.client_id,
        name=client.name,
        budget=client.budget,
        queries_used=client.used,
        queries_remaining=client.remaining,
        revoked=client.revoked,
        created_at=client.created_at,
    )


def _defence_view(client: Client, service: TargetService) -> ClientDefenceView:
    queried = service.store.models_queried(client.client_id)
    models = [m for m in queried if service.detection.watches(m)]
    by_model = {
        model: {
            name: DetectorView(**view)
            for name, view in service.detection.view(client.client_id, model).items()
        }
        for model in models
    }
    return ClientDefenceView(
        **_view(client, service).model_dump(),
        detectors=by_model[models[0]] if models else {},
        detectors_by_model=by_model,
        input_defenses={
            m: InputDefenseView(**service.screening.view(client.client_id, m))
            for m in queried
            if service.screening.screen_for(m) is not None
        },
        blocked_on=[m for m in queried if service.is_blocked(client.client_id, m)],
        training_ledger=[
            TrainingLedgerEntry(**{key: entry[key] for key in TrainingLedgerEntry.model_fields})
            for entry in service.store.training_ledger(client.client_id)
        ],
    )


@router.post("/clients", status_code=status.HTTP_201_CREATED, responses=documented(*BODY_STATUSES))
def create_client(body: ClientCreate, service: ServiceDep, _: AdminDep) -> ClientCreated:
    client, api_key = service.store.create_client(
        body.name, body.budget, training_quota=body.training_quota, org=body.org
    )
    return ClientCreated(
        client_id=client.client_id,
        name=client.name,
        api_key=api_key,
        budget=client.budget,
        training_quota=body.training_quota,
        org=body.org,
    )


@router.get("/clients")
def list_clients(service: ServiceDep, _: AdminDep) -> list[ClientView]:
    orgs = service.store.client_orgs()
    return [_view(client, service, orgs) for client in service.store.list_clients()]


@router.get("/clients/{client_id}", responses=documented(404, 422))
def get_client(client_id: str, service: ServiceDep, _: AdminDep) -> ClientDefenceView:
    """Usage and, per detector, its first alarm, current statistic and threshold."""
    return _defence_view(service.store.get_client(client_id), service)


@router.get("/alarms")
def list_alarms(service: ServiceDep, _: AdminDep) -> list[AlarmView]:
    """Every detector's first alarm on every client and model, and every detector in error,
    oldest first."""
    alarms = [AlarmView(**alarm) for alarm in service.store.list_alarms()]
    alarms += [AlarmView(**alarm) for alarm in service.store.list_group_alarms()]
    errors = [AlarmView(**error, status="error") for error in service.store.list_detector_errors()]
    return sorted(alarms + errors, key=lambda view: view.created_at)


@router.delete("/clients/{client_id}", responses=documented(404, 422))
def revoke_client(client_id: str, service: ServiceDep, _: AdminDep) -> ClientView:
    return _view(service.store.revoke_client(client_id), service)


@router.get("/training-jobs")
def list_all_jobs(service: ServiceDep, _: AdminDep) -> list[AdminJobView]:
    """Every client's training jobs, oldest first."""
    return [admin_job_view(job) for job in service.store.list_jobs()]


@router.delete("/training-jobs/{job_id}", responses=documented(404, 409, 422))
def cancel_any_job(job_id: str, service: ServiceDep, _: AdminDep) -> AdminJobView:
    return admin_job_view(service.store.cancel_job(job_id))


@router.get("/datasets")
def list_all_datasets(service: ServiceDep, _: AdminDep) -> list[AdminDatasetView]:
    return [AdminDatasetView(**row) for row in service.store.list_datasets()]


@router.delete("/datasets/{dataset_id}", responses=documented(404, 422))
def delete_any_dataset(dataset_id: str, service: ServiceDep, _: AdminDep) -> AdminDatasetView:
    return AdminDatasetView(**remove_dataset(service, dataset_id, None))
