"""Experiment trackers (`report_to`): every metrics.jsonl record of the main process is also sent
to TensorBoard, W&B and/or MLflow through accelerate's trackers.

Names: an optimiser-step record (it has `step`) logs its numeric fields as `train/<field>` at
that step (RFT: `train/<phase>/<field>`, each model with its own step counter); an event record
logs its numeric fields as `event/<event>/<field>` at the latest optimiser step seen. Strings,
lists and non-finite numbers are left to metrics.jsonl. TensorBoard writes to
OUT/trackers/demoalign/; W&B (project `demoalign`) keeps its files in OUT/trackers/wandb/;
MLflow logs to its own tracking URI (MLFLOW_TRACKING_URI, else mlflow's default), experiment
`demoalign` (or MLFLOW_EXPERIMENT_NAME). W&B and MLflow runs are named after the run folder.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import parse_report_to

PROJECT = "demoalign"
FOLDER = "trackers"


def tracker_values(record: dict, prefix: str) -> dict[str, float]:
    """The finite numeric fields of `record` (booleans as 0/1), named `prefix/field`."""
    values = {}
    for key, value in record.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[f"{prefix}/{key}"] = value
    return values


class TrackerSink:
    """Gets every record metrics.jsonl gets (runio.MetricsLog); logs it through
    `accelerator.log`."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.step = 0

    def log(self, record: dict) -> None:
        if "event" in record:
            fields = {k: v for k, v in record.items() if k != "event"}
            values = tracker_values(fields, f"event/{record['event']}")
            step = self.step
        else:
            fields = {k: v for k, v in record.items() if k not in ("step", "phase")}
            phase = record.get("phase")
            values = tracker_values(fields, f"train/{phase}" if phase else "train")
            step = int(record.get("step", self.step))
            self.step = max(self.step, step)
        if values:
            self.accelerator.log(values, step=step)

    def close(self) -> None:
        self.accelerator.end_training()


def accelerator_options(config) -> dict:
    """Accelerator(...) arguments for the config's trackers (none: no arguments)."""
    names = parse_report_to(getattr(config, "report_to", "none"))
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(Path(config.output_dir) / FOLDER)}


def start_trackers(accelerator, config, config_dict: dict) -> TrackerSink | None:
    """init_trackers (after the run folder is claimed: claiming clears it); None without
    trackers. The config goes in as the run's hyperparameters."""
    names = parse_report_to(getattr(config, "report_to", "none"))
    if not names:
        return None
    out = Path(config.output_dir)
    (out / FOLDER).mkdir(parents=True, exist_ok=True)
    kwargs = {
        "wandb": {"name": out.name, "dir": str(out / FOLDER)},
        "mlflow": {"run_name": out.name},
    }
    hparams = {k: v for k, v in config_dict.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(
        PROJECT, config=hparams, init_kwargs={n: kwargs[n] for n in names if n in kwargs}
    )
    return TrackerSink(accelerator)
