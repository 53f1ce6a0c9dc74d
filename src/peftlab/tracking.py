"""Experiment tracking: TensorBoard and MLflow, each only when the user asks for it.

    peftlab train ... --report-to tensorboard,mlflow
    tensorboard --logdir runs/x/tensorboard          # or, for a compare: --logdir runs/cmp/variants
    mlflow ui --backend-store-uri sqlite:///runs/x/mlflow/mlflow.db

``metrics.jsonl`` stays the record of a run; a tracker receives the same numbers as they are
written: every logged step (loss, learning rate, gradient norm, tokens/s), validation losses,
the resolved config as hyperparameters, the final results, and (MLflow) files such as a
report's plots as artifacts.

- TensorBoard: event files under ``RUN/tensorboard`` through ``torch.utils.tensorboard``, which
  writes with the ``tensorboard`` package's event-file writer.
- MLflow: its own client. Without ``MLFLOW_TRACKING_URI`` the store is local to the run (or to
  the compare/sweep folder, so that every variant is a run of one experiment):
  ``sqlite:///DIR/mlflow/mlflow.db`` with artifacts in ``DIR/mlflow/artifacts`` (MLflow 3 keeps
  plain-file stores in maintenance mode; SQLite is its local default).

A missing package is a one-line error naming the package to install, raised before anything
loads; nothing is written to a tracker the user did not choose.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from peftlab.errors import UserError

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # --report-to name -> the package it needs


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> ``("tensorboard", "mlflow")``; ``None``/``none`` -> no tracker."""
    if not text or text.strip().lower() == "none":
        return ()
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"--report-to {', '.join(unknown)} is not a tracker; choose from none, {', '.join(TRACKERS)} (comma-separated)")
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install 'peftlab[tracking]' "
                            f"(or drop {name} from --report-to)")
    return names


def _flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Hyperparameters as strings (MLflow params are strings; lists and None written out)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in config.items()}


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        if config:  # the hyperparameters, once per run (a run reopened to add its test scores passes none)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:  # TensorBoard keeps scalars and text, not files
        pass

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def mlflow_store(store_dir: Path) -> tuple[str, str]:
    """(tracking URI, artifact location): ``MLFLOW_TRACKING_URI`` when set, else a SQLite store under ``store_dir``."""
    artifacts = (store_dir / "mlflow" / "artifacts").resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, artifacts.as_uri()
    (store_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store_dir / 'mlflow' / 'mlflow.db').resolve()}", artifacts.as_uri()


class MLflowTracker:
    """One MLflow run, through the client API (no global active run: compare variants can't collide)."""

    def __init__(self, store_dir: Path, experiment: str, run_name: str, config: dict[str, Any] | None,
                 run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (creating the database tables) would interleave our output
            logging.getLogger(name).setLevel(logging.WARNING)
        uri, artifacts = mlflow_store(store_dir)
        self.client = MlflowClient(uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=artifacts)
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags={"peftlab": "true"}).info.run_id
            for key, value in (_flat_params(config) if config else {}).items():
                self.client.log_param(run_id, key, value[:6000])
        self.run_id = run_id

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in _scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class Trackers:
    """The trackers a run reports to (possibly none), used like one."""

    def __init__(self, trackers: list) -> None:
        self.trackers = trackers

    @classmethod
    def open(cls, names: tuple[str, ...], run_dir: Path, config: dict[str, Any], *, run_name: str,
             store_dir: Path | None = None, experiment: str | None = None, mlflow_run_id: str | None = None) -> Trackers:
        trackers: list = []
        if "tensorboard" in names:
            trackers.append(TensorBoardTracker(run_dir / "tensorboard", run_name, config))
        if "mlflow" in names:
            store = store_dir or run_dir
            trackers.append(MLflowTracker(store, experiment or Path(store).resolve().name, run_name, config, mlflow_run_id))
        return cls(trackers)

    @property
    def mlflow_run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if isinstance(t, MLflowTracker)), None)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(record, step)

    def log_artifact(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        stopped = isinstance(error, KeyboardInterrupt) or getattr(error, "signum", None) is not None
        self.close("FINISHED" if error is None else "KILLED" if stopped else "FAILED")

    def close(self, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED (MLflow shows it; TensorBoard has no such notion)."""
        for tracker in self.trackers:
            tracker.close(status)
