"""Per-query input defences (``TARGET_INPUT_DEFENSES``): a hosted model's sanitised twin
("Less is More", seed 001) screens every image before it is answered.

Each image runs through the hosted (parent) model and its sanitised twin, one forward pass of
each per batch (``SanitizedPair.assess``), which scores it (KL(p_parent || p_sanitised) for
``kl-sanitized``) and flags it when the score is over the pair's threshold (set at build time
from a pass rate of held-out normal images). What the client gets depends on the mode:

- ``log``: the parent answers, as without a defence; scores and flags are only recorded;
- ``sanitized``: the sanitised model answers; scores and flags are recorded;
- ``framework`` (the paper's Fig. 8): a flagged image is rejected (``null`` label, its index in
  ``rejected``, charged like an answered one: the models ran, and a free rejection would be a
  free oracle); the others are answered by the sanitised model.

Every charged request's scores and flags go into the ``input_screening`` table in the charge's
own transaction. Per client and model, ``RejectedShareAlarm`` counts the flagged images among its
last ``alarm_window``; its alarm goes into the same alarms table as the stealing detectors' (as
detector ``<kind>``, e.g. ``kl-sanitized``), counts in ``mlaas_alarms``, and under the model's
``block`` alarm policy refuses the client from then on. The alarm counts flagged images in every
mode (in ``framework`` mode those are exactly the rejected ones), so ``log`` mode shows which
clients a ``framework`` target would have refused. A stream's state is rebuilt from the table
on first use, so it survives a restart.

The default ``alarm_share`` follows from the pass rate (``share_for_pass_rate``): a normal client
fills one window with probability at most 1e-6.

The pair is stored beside the checkpoint as ``<model>.sanitized-<method>.pt`` (where ``defender
sanitize`` puts it too); it is accepted only for the parent checkpoint (sha256) it was built for
and the configured method, threshold, score and pass rate. ``target-service train`` builds it; at start-up a missing or stale one is built
(logged) when ``TARGET_TRAIN_MISSING``, otherwise the start-up fails naming why.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from defenses.output_policies import OutputPolicy
from defenses.rejection_alarm import DEFAULT_ALARM_WINDOW, RejectedShareAlarm, share_for_pass_rate
from target_service.metrics import ServiceMetrics
from target_service.state import Screening, StateStore

if TYPE_CHECKING:  # the sanitisation package is imported when a pair is loaded, not by settings
    from defenses.sanitization import SanitizedPair

logger = logging.getLogger(__name__)

# kind -> the pair's score
KINDS: dict[str, str] = {
    "kl-sanitized": "kl",
    "js-sanitized": "js",
    "disagree-sanitized": "disagree",
}
Kind = Literal["kl-sanitized", "js-sanitized", "disagree-sanitized"]
Mode = Literal["log", "sanitized", "framework"]
AlarmPolicy = Literal["log", "block"]


class InputDefenceError(ValueError):
    """A sanitised pair that cannot serve a configured input defence (missing, stale, broken)."""


class InputDefenseSpec(BaseModel):
    """One model's entry in ``TARGET_INPUT_DEFENSES`` (strict: nothing is coerced, unknown keys
    are refused). ``threshold``, ``method``, ``pass_rate``, ``epochs``, ``seed`` and
    ``fonts_dirs`` say how the pair is built; ``mode`` and the alarm settings how it is used."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Kind = Field(
        description="kl-sanitized: KL(parent || sanitised), the paper's; js-sanitized: "
        "Jensen-Shannon; disagree-sanitized: flag whenever the two models' labels differ."
    )
    mode: Mode
    method: Literal["self", "canonical"] = "self"
    threshold: float = Field(
        gt=0, lt=1, description="Sanitisation: training images kept at or above this confidence."
    )
    pass_rate: float = Field(
        default=0.98, gt=0, lt=1, description="Share of held-out normal images let through."
    )
    alarm_window: int = Field(default=DEFAULT_ALARM_WINDOW, ge=1, le=1_000_000)
    alarm_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Alarm when this share of the last alarm_window images is flagged; default "
        "from pass_rate: a normal client fills a window with probability <= 1e-6.",
    )
    epochs: int | None = Field(default=None, ge=1, description="Sanitised model's epochs.")
    seed: int = Field(default=0, ge=0)
    fonts_dirs: list[str] = Field(default_factory=list, description="Canonical: extra fonts.")

    @property
    def score(self) -> str:
        return KINDS[self.kind]

    @property
    def alarm_share_or_default(self) -> float:
        if self.alarm_share is not None:
            return self.alarm_share
        return share_for_pass_rate(self.pass_rate, window=self.alarm_window)


def sanitized_pair_path(checkpoint_dir: Path, model: str, method: str) -> Path:
    """Where ``defender sanitize`` puts a sanitised twin by default, beside its parent."""
    from defenses.sanitization import sanitized_checkpoint_path

    return sanitized_checkpoint_path(checkpoint_dir / f"{model}.pt", method)


def build_pair(
    model: str, checkpoint_dir: Path, spec: InputDefenseSpec, *, data_root: Path | None = None
) -> SanitizedPair:
    """Build (or rebuild) a model's sanitised pair from its checkpoint, beside it."""
    from defenses.sanitization import build_sanitized_pair

    started = time.perf_counter()
    pair = build_sanitized_pair(
        checkpoint_dir / f"{model}.pt",
        method=spec.method,
        threshold=spec.threshold,
        pass_rate=spec.pass_rate,
        score=spec.score,
        data_root=data_root,
        fonts_dirs=tuple(Path(folder) for folder in spec.fonts_dirs),
        epochs=spec.epochs,
        seed=spec.seed,
        out_path=sanitized_pair_path(checkpoint_dir, model, spec.method),
    )
    logger.info(
        "built the sanitised twin of %s (%s, threshold %g) in %.1f s: %s threshold %.6g at "
        "%g%% normal pass",
        model, spec.method, spec.threshold, time.perf_counter() - started, spec.score,
        pair.score_threshold, 100 * spec.pass_rate,
    )  # fmt: skip
    return pair


def load_pair(
    model: str,
    checkpoint_dir: Path,
    spec: InputDefenseSpec,
    *,
    build_missing: bool,
    data_root: Path | None = None,
) -> SanitizedPair:
    """The model's stored pair; a missing or stale one is built when ``build_missing`` (a
    warning says why), else InputDefenceError names the problem."""
    from defenses.sanitization import SanitizationError, load_sanitized_pair

    path = sanitized_pair_path(checkpoint_dir, model, spec.method)
    problem: str | None = f"there is no sanitised model at {path}"
    if path.exists():
        try:
            pair = load_sanitized_pair(path, checkpoint_dir / f"{model}.pt")
        except (SanitizationError, OSError) as exc:
            problem = str(exc)
        else:
            problem = stale_because(pair, spec)
            if problem is None:
                return pair
    if not build_missing:
        raise InputDefenceError(
            f"TARGET_INPUT_DEFENSES[{model!r}]: {problem}; build it with `target-service train` "
            "(or start with TARGET_TRAIN_MISSING=true)"
        )
    logger.warning("%s: %s; building it now (first start)", model, problem)
    return build_pair(model, checkpoint_dir, spec, data_root=data_root)


def stale_because(pair: SanitizedPair, spec: InputDefenseSpec) -> str | None:
    """Why a stored pair does not fit the configured spec, or None when it does."""
    built = {
        "method": pair.method,
        "threshold": pair.threshold,
        "score": pair.score_kind,
        "pass_rate": pair.pass_rate,
    }
    wanted = {
        "method": spec.method,
        "threshold": spec.threshold,
        "score": spec.score,
        "pass_rate": spec.pass_rate,
    }
    differ = [
        f"{key} {built[key]!r} (configured {wanted[key]!r})"
        for key in built
        if built[key] != wanted[key]
    ]
    return f"the stored sanitised model was built with {', '.join(differ)}" if differ else None


@dataclass(frozen=True)
class Screened:
    """A batch after screening: the response fields, the labels the answering model computed
    (what the stealing detectors observe, rejected images included) and the record to store."""

    answer: dict[str, Any]
    labels: list[int]
    screening: Screening


@dataclass
class InputScreen:
    """One hosted model's input defence."""

    model: str
    spec: InputDefenseSpec
    pair: SanitizedPair

    @property
    def can_reject(self) -> bool:
        return self.spec.mode == "framework"

    def screen(self, x: torch.Tensor, policy: OutputPolicy) -> Screened:
        """Score a float (n, C, H, W) batch with one forward pass of each model and answer it
        as the mode says."""
        with torch.inference_mode():
            assessment = self.pair.assess(x)
        answering = (
            assessment.parent_logits if self.spec.mode == "log" else assessment.sanitized_logits
        )
        answering = torch.as_tensor(answering)
        flags = np.asarray(assessment.flagged, dtype=bool)
        answer = policy.render(answering)
        rejected = np.flatnonzero(flags).tolist() if self.can_reject else []
        if self.can_reject:
            answer = withhold(answer, rejected)
        return Screened(
            answer,
            answering.argmax(dim=1).tolist(),
            Screening(
                [float(s) for s in np.asarray(assessment.scores, dtype=np.float64)],
                flags.tolist(),
                len(rejected),
            ),
        )


def withhold(answer: dict[str, Any], rejected: list[int]) -> dict[str, Any]:
    """The response with every per-image entry of the ``rejected`` images set to None, and
    ``rejected`` listed."""
    out: dict[str, Any] = {}
    for key, values in answer.items():
        values = list(values)
        for index in rejected:
            values[index] = None
        out[key] = values
    return {**out, "rejected": list(rejected)}


@dataclass
class _Stream:
    alarm: RejectedShareAlarm
    recent_scores: deque[float]
    rejected_total: int = 0
    through_entry: int = 0  # the last ledger entry observed


class ScreeningHub:
    """Every hosted model's input defence, and every client's flagged-share alarm on it.

    ``stream_lock`` is the detection hub's per-(client, model) lock: the service holds it from
    the block check through the charge to ``observe``, so an alarm raised by one request is seen
    by the next one before it is charged."""

    def __init__(
        self,
        store: StateStore,
        screens: dict[str, InputScreen],
        *,
        metrics: ServiceMetrics,
        alarm_policies: dict[str, AlarmPolicy],
        stream_lock: Callable[[str, str], AbstractContextManager[None]],
    ) -> None:
        self.store = store
        self.screens = screens
        self.metrics = metrics
        self.alarm_policies = alarm_policies
        self.stream_lock = stream_lock
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._alarmed = {
            (a["client_id"], a["model"])
            for a in store.list_alarms()
            if a["model"] in screens and a["detector"] == screens[a["model"]].spec.kind
        }

    def screen_for(self, model: str) -> InputScreen | None:
        return self.screens.get(model)

    def is_blocked(self, client_id: str, model: str) -> bool:
        """True once this client's flagged-share alarm fired and the model's policy is block."""
        return (
            self.alarm_policies.get(model, "log") == "block" and (client_id, model) in self._alarmed
        )

    def catch_up(self, client_id: str, model: str) -> None:
        """Load the stream (call under ``stream_lock``, before the block check): after a restart
        its alarm is recorded before the client's next request is charged."""
        self._stream(client_id, model)

    def observe(self, client_id: str, model: str, entry_id: int, screening: Screening) -> None:
        """Feed one charged request (call under ``stream_lock``); record a new alarm at once."""
        stream = self._stream(client_id, model)
        if entry_id <= stream.through_entry:
            return  # loaded from the table already
        try:
            self._feed(client_id, model, stream, screening)
        except Exception:  # e.g. the store: rebuild the stream from the table next time
            del self._streams[(client_id, model)]
            raise
        stream.through_entry = entry_id
        self.metrics.input_flagged.labels(model).inc(sum(screening.flags))
        self.metrics.input_rejected.labels(model).inc(screening.rejected)

    def view(self, client_id: str, model: str) -> dict[str, Any]:
        """The admin view of one client's stream on a screened model."""
        screen = self.screens[model]
        with self.stream_lock(client_id, model):
            stream = self._stream(client_id, model)
            alarm, scores = stream.alarm, np.asarray(stream.recent_scores, dtype=np.float64)
            return {
                "kind": screen.spec.kind,
                "mode": screen.spec.mode,
                "images": alarm.queries_seen,
                "flagged": alarm.flagged_total,
                "rejected": stream.rejected_total,
                "recent_images": len(scores),
                "recent_flagged": alarm.recent_flagged,
                "statistic": alarm.verdict.statistic,
                "threshold": alarm.share,
                "alarm_window": alarm.window,
                "first_alarm_at": alarm.first_alarm_at,
                "score": screen.spec.score,
                "score_threshold": float(screen.pair.score_threshold),
                "recent_score_mean": float(scores.mean()) if len(scores) else None,
                "recent_score_max": float(scores.max()) if len(scores) else None,
            }

    # -- internals -----------------------------------------------------------------------------
    def _stream(self, client_id: str, model: str) -> _Stream:
        stream = self._streams.get((client_id, model))
        if stream is None:
            stream = self._load(client_id, model)
            self._streams[(client_id, model)] = stream
        return stream

    def _load(self, client_id: str, model: str) -> _Stream:
        """Replay the stream's whole screening log (every charged request's flags)."""
        spec = self.screens[model].spec
        stream = _Stream(
            RejectedShareAlarm(window=spec.alarm_window, share=spec.alarm_share_or_default),
            deque(maxlen=spec.alarm_window),
        )
        for entry_id, screening in self.store.screening_log(client_id, model):
            self._feed(client_id, model, stream, screening)
            stream.through_entry = entry_id
        return stream

    def _feed(self, client_id: str, model: str, stream: _Stream, screening: Screening) -> None:
        verdict = stream.alarm.observe(screening.flags)
        stream.recent_scores.extend(screening.scores)
        stream.rejected_total += screening.rejected
        first = stream.alarm.first_alarm_at
        if first is None or (client_id, model) in self._alarmed:
            return
        kind = self.screens[model].spec.kind
        self.store.record_alarm(
            client_id,
            model=model,
            detector=kind,
            query_index=first,
            statistic=verdict.statistic,
            threshold=verdict.threshold,
        )
        self._alarmed.add((client_id, model))
        self.metrics.alarms.labels(model, kind).inc()
        logger.warning(
            "%s flagged client %s on %s at query %d: %d of its last %d images flagged",
            kind, client_id, model, first, stream.alarm.recent_flagged, stream.alarm.window,
        )  # fmt: skip


def load_screens(
    specs: dict[str, InputDefenseSpec],
    checkpoint_dir: Path,
    *,
    build_missing: bool,
    data_root: Path | None = None,
) -> dict[str, InputScreen]:
    """Every configured input defence, its pair loaded (or built, see ``load_pair``)."""
    return {
        model: InputScreen(
            model,
            spec,
            load_pair(
                model, checkpoint_dir, spec, build_missing=build_missing, data_root=data_root
            ),
        )
        for model, spec in specs.items()
    }
