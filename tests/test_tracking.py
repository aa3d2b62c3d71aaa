"""Trackers (`report_to`): every metrics.jsonl record also goes to accelerate's trackers; the
TensorBoard event file of a CPU run holds the loss of every step; a missing package is one clear
error before the run folder exists."""

import importlib.util

import pytest

from conftest import read_metrics, small_run_config
from demoalign import SFTConfig, tracking, train
from demoalign.tracking import TrackerSink, parse_report_to

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_to_parsing():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        parse_report_to("tensorboard,comet")


class RecordingAccelerator:
    def __init__(self):
        self.calls, self.ended = [], False

    def log(self, values, step):
        self.calls.append((step, values))

    def end_training(self):
        self.ended = True


def test_sink_names_steps_phases_and_events():
    acc = RecordingAccelerator()
    sink = TrackerSink(acc)
    sink.log({"event": "run_start", "method": "rft", "examples": 16, "processes": 1})
    sink.log({"step": 1, "loss": 0.5, "lr": 1e-3, "method": "sft", "epoch": 0})
    sink.log({"step": 3, "phase": "policy", "loss": 0.2, "kl": float("nan"), "ok": True})
    sink.log({"event": "stage_start", "pairs": 8, "note": "text only"})
    sink.log({"event": "text", "note": "no numbers"})
    sink.close()
    assert acc.calls == [
        (0, {"event/run_start/examples": 16, "event/run_start/processes": 1}),
        (1, {"train/loss": 0.5, "train/lr": 1e-3, "train/epoch": 0}),
        (3, {"train/policy/loss": 0.2, "train/policy/ok": 1}),
        (3, {"event/stage_start/pairs": 8}),
    ]
    assert acc.ended


def test_a_missing_tracker_package_fails_before_the_folder_exists(
    tiny_model_dir, tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="pip install mlflow"):
        train(small_run_config(SFTConfig, tiny_model_dir, out, report_to="tensorboard,mlflow"))
    assert not out.exists()


def test_tensorboard_event_file_holds_the_loss(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_run_config(
        SFTConfig, tiny_model_dir, tmp_path / "run", epochs=2, report_to="tensorboard"
    )
    out = train(config)
    folder = out / "trackers" / tracking.PROJECT
    files = list(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "event/run_end/steps"} <= set(tags)
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    steps = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert len(steps) == 8 and logged.keys() == steps.keys()
    assert all(logged[s] == pytest.approx(steps[s], rel=1e-6) for s in steps)
    run_end = events.Scalars("event/run_end/steps")
    assert [(e.step, e.value) for e in run_end] == [(8, 8.0)]


def test_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run", report_to="wandb"))
    runs = list((out / "trackers" / "wandb").glob("offline-run-*"))
    assert runs, "W&B offline run folder missing"


def test_mlflow_local_store(tiny_model_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    # mlflow 3 refuses its file store unless asked; its sqlite store needs sqlalchemy, which
    # mlflow-skinny lacks. The file store works with both.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run", report_to="mlflow"))
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert sorted(m.step for m in history) == steps
