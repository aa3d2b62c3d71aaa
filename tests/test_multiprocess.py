"""Two processes under `accelerate launch` reach the same losses as one process with the same
global batch (gloo on CPU; on 2 cores this is a correctness test, not a speed one)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DOLLY, small_run_config
from demoalign import IRFTConfig, SFTConfig, train

HERE = Path(__file__).resolve().parent


def _step_metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"step"' in line]


def _launch_two_processes(method, tiny_model_dir, out, extra):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate launcher not found beside the interpreter")
    args = [
        f"model={tiny_model_dir}",
        f"data={DOLLY}",
        "max_examples=16",
        f"output_dir={out}",
        "max_length=80",
        "max_prompt_length=40",
        "batch_size=2",
        "learning_rate=1e-3",
        "cpu=true",
        "show_progress=false",
        *extra,
    ]
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(HERE / "ddp_run.py"),
        method,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_dir, tmp_path):
    irft_extra = ["max_new_tokens=10", "generation_batch_size=8", "stages=2"]
    two_irft = _launch_two_processes("irft", tiny_model_dir, tmp_path / "irft2", irft_extra)
    two_sft = _launch_two_processes("sft", tiny_model_dir, tmp_path / "sft2", [])
    one_irft = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "irft1", batch_size=4))
    one_sft = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "sft1", batch_size=4))

    for one, two in ((one_irft, two_irft), (one_sft, two_sft)):
        a, b = _step_metrics(one), _step_metrics(two)
        assert len(a) == len(b) == 4
        assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-4, abs=1e-5)
        assert [m["grad_norm"] for m in b] == pytest.approx([m["grad_norm"] for m in a], rel=1e-3)
    # Same negatives whatever the number of processes (round-robin, per-batch seeds).
    for stage in ("1", "2"):
        assert (one_irft / "stages" / stage / "negatives.jsonl").read_text().count("\n") == 8
        negs = [
            json.loads(x)["negative"]
            for x in (one_irft / "stages" / stage / "negatives.jsonl").read_text().splitlines()
        ]
        negs2 = [
            json.loads(x)["negative"]
            for x in (two_irft / "stages" / stage / "negatives.jsonl").read_text().splitlines()
        ]
        assert negs == negs2
