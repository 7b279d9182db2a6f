"""Experiment trackers: MLflow, TensorBoard, Weights & Biases (train.report_to), through their own clients.

    trackers = Trackers.open(cfg)             # None when train.report_to is empty
    trackers.metrics({"loss": 0.7, ...}, step=12)
    trackers.summary({"eval/tuned/accuracy": 0.98}); trackers.artifact(paths.report_html)
    trackers.close()

Each backend gets ONE run per cpo-ray run, named after it, with the resolved config as its parameters. Their ids
live in <output_dir>/tracking.json (storage, like every artifact): a resumed run, a re-submitted job or the
pipeline's final stage reopens the same tracked runs and appends, and steps already logged (those replayed
after a crash) are not logged twice. The run log actor (cpo_ray.train.runlog) feeds them every step; the
pipeline adds the endpoint's table and report.html/eval.json at the end.

    mlflow       train.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite in local_dir/mlflow.db (MLflow 3
                 keeps plain file stores, file:..., behind MLFLOW_ALLOW_FILE_STORE=true)
    tensorboard  event files in local_dir/tensorboard, copied to <output_dir>/tensorboard when output_dir is storage
    wandb        project train.wandb_project; offline with WANDB_MODE=offline (files under local_dir/wandb)
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

from cpo_ray.contract import RunPaths
from cpo_ray.storage import Location

BACKENDS = ("mlflow", "tensorboard", "wandb")


def flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """The config as dotted key -> value string (what trackers take as parameters)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flat(v, key + ".")
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def numbers(row: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics row (lists, strings and NaN are not tracked)."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and k != "step"
    }


class Trackers:
    def __init__(self, cfg, state: dict, state_file: Location, local_dir: Path):
        self.cfg, self.state, self.state_file, self.local_dir = cfg, state, state_file, local_dir
        self.backends = {}
        for name in cfg.train.report_to:
            self.backends[name] = getattr(self, f"_open_{name}")()
        self._save()

    @classmethod
    def open(cls, cfg) -> Trackers | None:
        if not cfg.train.report_to:
            return None
        paths = RunPaths.of(cfg)
        state_file = paths.output_dir / "tracking.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        return cls(cfg, state, state_file, paths.local_dir)

    # --- what gets logged ---------------------------------------------------------------------------
    def metrics(self, row: dict, step: int) -> None:
        """A step's numbers, once per step: a step at or below the last one logged (replayed) is skipped. A final
        row adds its held-out scores at its step (its training metrics repeat that step's)."""
        if row.get("final"):
            values = {k: v for k, v in numbers(row).items() if k.startswith("eval/")}
            done = step < self.state.get("last_step", -1) or step in self.state.get("final_steps", [])
            if values and not done:
                for name, backend in self.backends.items():
                    getattr(self, f"_metrics_{name}")(backend, values, step)
                self.state.setdefault("final_steps", []).append(step)
            return
        values = numbers(row)
        if not values or step <= self.state.get("last_step", -1):
            return
        for name, backend in self.backends.items():
            getattr(self, f"_metrics_{name}")(backend, values, step)
        self.state["last_step"] = step

    def summary(self, values: dict[str, float]) -> None:
        """End-of-run numbers (the endpoint's table), logged at the last step."""
        step = max(self.state.get("last_step", 0), 0)
        for name, backend in self.backends.items():
            getattr(self, f"_metrics_{name}")(backend, numbers(values), step)

    def event(self, text: str) -> None:
        """A note on the tracked run (a resume, a selected checkpoint): a tag / text entry."""
        for name, backend in self.backends.items():
            getattr(self, f"_event_{name}")(backend, text)

    def artifact(self, loc: Location) -> None:
        """A file of the run (report.html, eval.json) attached to the tracked runs that keep files."""
        if not loc.is_file():
            return
        local = self.local_dir / "tracked" / loc.name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(loc.read_bytes())
        if "mlflow" in self.backends:
            client, run_id = self.backends["mlflow"]
            client.log_artifact(run_id, str(local))
        if "wandb" in self.backends:
            self.backends["wandb"].save(str(local), base_path=str(local.parent), policy="now")

    def flush(self) -> None:
        if "tensorboard" in self.backends:
            self.backends["tensorboard"].flush()
            self._publish_tensorboard()
        self._save()

    def close(self) -> None:
        self.flush()
        if "tensorboard" in self.backends:
            self.backends["tensorboard"].close()
            self._publish_tensorboard()
        if "wandb" in self.backends:
            self.backends["wandb"].finish()
        if "mlflow" in self.backends:
            client, run_id = self.backends["mlflow"]
            client.set_terminated(run_id)
        self._save()

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    # --- MLflow ---------------------------------------------------------------------------------------
    def _mlflow_uri(self) -> str:
        import os

        self.local_dir.mkdir(parents=True, exist_ok=True)
        return (self.cfg.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.local_dir / 'mlflow.db').resolve()}")  # fmt: skip

    def _open_mlflow(self):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self._mlflow_uri())
        run_id = self.state.get("mlflow_run_id")
        if run_id is None:
            name = self.cfg.train.mlflow_experiment
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else client.create_experiment(name)
            run_id = client.create_run(exp_id, run_name=self.cfg.name, tags={"cpo_ray.run": self.cfg.name}).info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in flat(self.cfg.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i : i + 100])
            self.state["mlflow_run_id"] = run_id
        else:
            client.update_run(run_id, status="RUNNING")
        return client, run_id

    def _metrics_mlflow(self, backend, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = backend
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def _event_mlflow(self, backend, text: str) -> None:
        client, run_id = backend
        client.set_tag(run_id, f"cpo_ray.event.{int(time.time() * 1000)}", text[:5000])

    # --- TensorBoard -----------------------------------------------------------------------------------
    def _tensorboard_dir(self) -> Path:
        return self.local_dir / "tensorboard"

    def _open_tensorboard(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self._tensorboard_dir()))  # a new event file next to earlier ones: TB joins them

    def _metrics_tensorboard(self, writer, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)

    def _event_tensorboard(self, writer, text: str) -> None:
        writer.add_text("events", text, self.state.get("last_step", 0))

    def _publish_tensorboard(self) -> None:
        out = Location(self.cfg.output_dir) / "tensorboard"
        if not out.is_local and self._tensorboard_dir().exists():
            out.upload_from(self._tensorboard_dir())

    # --- Weights & Biases ------------------------------------------------------------------------------
    def _open_wandb(self):
        import wandb

        run_id = self.state.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        (self.local_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(project=self.cfg.train.wandb_project, name=self.cfg.name, id=run_id, resume="allow",
                          dir=str(self.local_dir), config=self.cfg.model_dump(mode="json"), reinit="create_new")  # fmt: skip

    def _metrics_wandb(self, run, values: dict[str, float], step: int) -> None:
        run.log(values, step=step)

    def _event_wandb(self, run, text: str) -> None:
        run.summary[f"event/{int(time.time())}"] = text
