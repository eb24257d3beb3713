"""Training workers: processes apart from the API process that turn queued jobs into models.

The queue is the ``training_jobs`` table. A worker claims a job with one conditional UPDATE
(``StateStore.claim_job``) and holds it by a lease that a heartbeat thread renews; after every
epoch it writes a resume checkpoint (model, optimizer, shuffling generator) and then records
the epoch, both conditional on its claim token. So:

- a worker killed mid-job (``kill -9`` of the service takes its workers with it: each one exits
  when its parent is gone) leaves a ``running`` job whose lease runs out; the next worker to
  claim it resumes from the last checkpoint, drawing the same batches an uninterrupted run would;
- a worker that lost its claim (lease expired, job cancelled) cannot record anything, so a job
  never has two runs at once that both count;
- a worker stopped with SIGTERM puts its job back in the queue at once.

``WorkerPool`` is the API process's side: it starts ``TARGET_TRAINING_WORKERS`` processes
(``python -m target_service.cli train-worker``) when a job is queued, and a supervisor thread
starts them again whenever jobs wait and a worker is missing (at start-up after a restart, or
after a worker died); it stops them at shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from defenses.mi_redundancy import calibrate_mi_reference
from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.checkpoints import save_checkpoint
from mlcore.training import accuracy, as_model_input, seed_everything, train_epoch
from target_service.datasets import DatasetFiles, declared_members, load_arrays
from target_service.errors import NotFound
from target_service.settings import Settings
from target_service.state import StateStore, open_store
from target_service.training_jobs import TrainingJobRequest, train_size
from target_service.zoo import (
    DEFAULT_DETECTORS,
    calibrate_checkpoint,
    user_calibration_path,
    user_mi_reference_path,
    user_model_path,
)

logger = logging.getLogger(__name__)


class WorkerStopped(Exception):
    """SIGTERM arrived: put the job back in the queue and exit."""


class JobLost(Exception):
    """The job is no longer this worker's (cancelled, or its lease was taken over)."""


def resume_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / "jobs" / job_id / "resume.pt"


class WorkerPool:
    """The training worker processes of one API process, started when there is work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def supervise(self, store: StateStore, every: float = 2.0) -> None:
        """Start a thread that keeps the workers up while jobs are queued or running."""

        def loop() -> None:
            while True:
                try:
                    if store.unfinished_jobs():
                        self.ensure_started()
                except Exception:  # the store closing at shutdown, or a failed spawn
                    logger.exception("training worker supervisor")
                if self._stopping.wait(every):
                    return

        self._supervisor = threading.Thread(target=loop, name="training-supervisor", daemon=True)
        self._supervisor.start()

    def ensure_started(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.processes = [p for p in self.processes if p.poll() is None]
            for _ in range(self.settings.training_workers - len(self.processes)):
                argv = [
                    sys.executable,
                    "-m",
                    "target_service.cli",
                    "train-worker",
                    "--state-dir",
                    str(self.settings.state_dir),
                ]
                self.processes.append(
                    subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=self._environment())
                )
                logger.info("started training worker pid %d", self.processes[-1].pid)

    def _environment(self) -> dict[str, str]:
        """The service's environment, with the settings a worker uses as this service has
        them (they may have been set in code rather than in the environment)."""
        settings = self.settings
        environment = {
            **os.environ,
            "TARGET_TRAINING_LEASE_SECONDS": str(settings.training_lease_seconds),
            "TARGET_TRAINING_POLL_SECONDS": str(settings.training_poll_seconds),
            "TARGET_TORCH_THREADS": str(settings.torch_threads),
        }
        if settings.database_url is not None:
            environment["TARGET_DATABASE_URL"] = settings.database_url.get_secret_value()
        return environment

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        with self._lock:
            for process in self.processes:
                if process.poll() is None:
                    process.terminate()
            for process in self.processes:
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.processes = []


def run_worker(settings: Settings) -> None:
    """Claim and run jobs until SIGTERM or until the parent process is gone."""
    torch.set_num_threads(settings.torch_threads)
    store = open_store(settings)
    parent = os.getppid()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise WorkerStopped

    signal.signal(signal.SIGTERM, stop)
    logger.info("training worker %d polling %s", os.getpid(), store.location)
    try:
        while os.getppid() == parent:
            if not run_next_job(store, settings, parent=parent):
                time.sleep(settings.training_poll_seconds)
    except WorkerStopped:
        logger.info("training worker %d stopped", os.getpid())
    finally:
        store.close()


def run_next_job(store: StateStore, settings: Settings, *, parent: int) -> bool:
    """Claim one job and run it to its end; False if the queue was empty. ``parent`` is the
    process whose exit this worker must not outlive."""
    token = uuid.uuid4().hex
    job = store.claim_job(token, lease_seconds=settings.training_lease_seconds)
    if job is None:
        return False
    JobRunner(store, settings, job, token, parent).run()
    return True


class JobRunner:
    """One claimed job, from its dataset (or its resume checkpoint) to a hosted model."""

    def __init__(
        self, store: StateStore, settings: Settings, job: dict[str, Any], token: str, parent: int
    ) -> None:
        self.store, self.settings, self.job, self.token = store, settings, job, token
        self.job_id: str = job["job_id"]
        self.request = TrainingJobRequest(**job["spec"]["request"])
        self.recipe = self.request.resolved_recipe()
        self.parent = parent
        self.lost = threading.Event()  # the job is no longer this worker's
        self.finished = threading.Event()  # ends the heartbeat

    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, daemon=True)
        heartbeat.start()
        try:
            metrics = self._train()
            self.store.finish_job(self.job_id, self.token, status="succeeded", metrics=metrics)
            logger.info("job %s succeeded: %s", self.job_id, metrics)
        except WorkerStopped:
            self.store.finish_job(self.job_id, self.token, status="queued")
            raise
        except JobLost:
            logger.info("job %s is no longer this worker's; dropped", self.job_id)
        except Exception as exc:
            logger.exception("job %s failed", self.job_id)
            self.store.finish_job(
                self.job_id, self.token, status="failed", error=f"{type(exc).__name__}: {exc}"[:500]
            )
        finally:
            self.finished.set()
            heartbeat.join()

    def _heartbeat(self) -> None:
        """Renew the lease; exit the process at once if the service that started it is gone
        (as if killed with it: the job's lease runs out and a new worker resumes it)."""
        interval = self.settings.training_lease_seconds / 3
        next_renewal = time.monotonic() + interval
        while not self.finished.wait(min(interval, 0.5)):
            if os.getppid() != self.parent:
                os._exit(1)
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + interval
                if not self.store.renew_lease(
                    self.job_id, self.token, lease_seconds=self.settings.training_lease_seconds
                ):
                    self.lost.set()  # cancelled or taken over: the epoch loop stops

    def _data(self, dataset_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            self.store.get_dataset(dataset_id)
        except NotFound:
            raise RuntimeError(f"dataset {dataset_id} was deleted before the job ran") from None
        return load_arrays(DatasetFiles(self.settings.state_dir / "datasets").path(dataset_id))

    def _train(self) -> dict[str, Any]:
        images, labels = self._data(self.request.dataset_id)
        n_train = train_size(len(images), self.recipe)
        order = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(self.recipe.seed)
        )
        train_index, validation_index = order[:n_train], order[n_train:]
        inputs, targets = as_model_input(images[train_index]), labels[train_index]
        channels, height, width = self.job["spec"]["input_shape"]
        arch_kwargs = arch_kwargs_for(
            self.request.arch, (channels, height, width), self.job["spec"]["classes"]
        )
        seed_everything(self.recipe.seed)
        model = build_model(self.request.arch, **arch_kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.recipe.learning_rate)
        generator = torch.Generator().manual_seed(self.recipe.seed)
        first_epoch = self._resume(model, optimizer, generator) + 1
        started = time.perf_counter()
        for epoch in range(first_epoch, self.recipe.epochs + 1):
            if self.lost.is_set():
                raise JobLost
            loss = train_epoch(
                model,
                optimizer,
                inputs,
                targets,
                batch_size=self.recipe.batch_size,
                generator=generator,
            )
            train_accuracy = accuracy(model, inputs, targets)
            self._check_claim()
            self._save_resume(model, optimizer, generator, epoch, loss, train_accuracy)
            if not self.store.record_epoch(
                self.job_id, self.token, epoch=epoch, loss=loss, train_accuracy=train_accuracy
            ):
                raise JobLost
        metrics = self._final_metrics(model, images, labels, train_index, validation_index)
        metrics["train_seconds_last_attempt"] = round(time.perf_counter() - started, 2)
        self._check_claim()
        self._publish(model, arch_kwargs, images[train_index], metrics)
        return metrics

    def _check_claim(self) -> None:
        """Raise JobLost unless the job is still this worker's (renewing its lease): a worker
        that lost the job writes none of its files."""
        if not self.store.renew_lease(
            self.job_id, self.token, lease_seconds=self.settings.training_lease_seconds
        ):
            raise JobLost

    def _resume(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> int:
        """Load the last resume checkpoint if there is one; returns the epochs already done.
        An epoch checkpointed but not yet recorded (killed in between) is recorded now."""
        path = resume_path(self.settings.state_dir, self.job_id)
        if not path.exists():
            return 0
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        epoch = int(saved["epoch"])
        if epoch > self.job["epoch"] and not self.store.record_epoch(
            self.job_id,
            self.token,
            epoch=epoch,
            loss=float(saved["loss"]),
            train_accuracy=float(saved["train_accuracy"]),
        ):
            raise JobLost
        logger.info("job %s resumes after epoch %d", self.job_id, epoch)
        return epoch

    def _save_resume(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        epoch: int,
        loss: float,
        train_accuracy: float,
    ) -> None:
        path = resume_path(self.settings.state_dir, self.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "epoch": epoch,
            "loss": loss,
            "train_accuracy": train_accuracy,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    def _final_metrics(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        train_index: torch.Tensor,
        validation_index: torch.Tensor,
    ) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "train_accuracy": accuracy(model, images[train_index], labels[train_index]),
            "train_size": len(train_index),
            "epochs": self.recipe.epochs,
        }
        if len(validation_index):
            metrics["validation_accuracy"] = accuracy(
                model, images[validation_index], labels[validation_index]
            )
            metrics["validation_size"] = len(validation_index)
        if self.request.test_dataset_id is not None:
            test_images, test_labels = self._data(self.request.test_dataset_id)
            metrics["test_accuracy"] = accuracy(model, test_images, test_labels)
            metrics["test_size"] = len(test_labels)
        return metrics

    def _publish(
        self,
        model: torch.nn.Module,
        arch_kwargs: dict[str, int],
        train_images: torch.Tensor,
        metrics: dict[str, Any],
    ) -> None:
        """The hosted model's checkpoint, the MI detector's benign reference and the detectors'
        calibration, both measured on the client's own training data (each skipped, and said
        so in the metrics, when that data cannot give one)."""
        state_dir = self.settings.state_dir
        detectors = dict(
            DEFAULT_DETECTORS if self.request.detectors is None else self.request.detectors
        )
        benign = train_images
        if benign.dtype != torch.uint8:
            benign = torch.from_numpy(np.round(train_images.numpy() * 255).astype(np.uint8))
        if "mi_redundancy" in detectors:
            window = int(detectors["mi_redundancy"].get("window", 100))
            if len(train_images) >= window:
                reference = user_mi_reference_path(state_dir, self.job_id)
                calibrate_mi_reference(
                    benign, window=window, bins=int(detectors["mi_redundancy"].get("bins", 256))
                ).save(reference)
                detectors["mi_redundancy"] = {**detectors["mi_redundancy"], "reference": reference}
            else:
                del detectors["mi_redundancy"]
                metrics["detectors_skipped"] = {
                    "mi_redundancy": f"needs at least {window} training images for its "
                    f"reference, got {len(train_images)}"
                }
        save_checkpoint(
            user_model_path(state_dir, self.job_id),
            model,
            arch=self.request.arch,
            arch_kwargs=arch_kwargs,
            dataset=f"upload:{self.request.dataset_id}",
            metrics=metrics,
            provenance=self._declared_provenance(),
        )
        if self.settings.calibration_clients > 0 and detectors:
            self._calibrate(detectors, benign, metrics)

    def _declared_provenance(self) -> dict[str, Any]:
        """The members the upload declared (checked at upload), so challenges can be opened."""
        path = DatasetFiles(self.settings.state_dir / "datasets").path(self.request.dataset_id)
        members = declared_members(path, data_root=self.settings.data_root)
        if members is None:
            return {}
        return {"members": members, "members_declared_by": f"upload:{self.request.dataset_id}"}

    def _calibrate(
        self, detectors: dict[str, dict[str, Any]], benign: torch.Tensor, metrics: dict[str, Any]
    ) -> None:
        """Calibrate the published model's detectors on the client's training images (as
        ``calibrate_target`` does the operator's): the cost grows with the simulated clients,
        so it runs here in the worker, never in the API process. Data that cannot give a
        calibration (too few clients for the share, no test within the horizon) is skipped
        with the reason in the metrics, never a failure."""
        clients = self.settings.calibration_clients
        logger.info(
            "job %s: calibrating %s on %d benign clients", self.job_id, sorted(detectors), clients
        )
        try:
            calibration = calibrate_checkpoint(
                user_model_path(self.settings.state_dir, self.job_id),
                detectors,
                benign,
                source={"model": self.job["model"], "images": f"upload:{self.request.dataset_id}"},
                clients=clients,
            )
        except ValueError as exc:  # DetectorError included: too few clients, no test in horizon
            metrics["calibration_skipped"] = f"detectors keep their default thresholds: {exc}"
            return
        self._check_claim()
        calibration.save(user_calibration_path(self.settings.state_dir, self.job_id))
        metrics["calibration_seconds"] = calibration.source["seconds"]
