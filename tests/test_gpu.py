"""GPU path (bf16 autocast on CUDA). Skipped cleanly where there is no GPU, as in CI."""

import json

import pytest
import torch

from conftest import small_run_config
from demoalign import IRFTConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_irft_on_gpu_in_bf16(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = small_run_config(
        IRFTConfig, tiny_model_dir, tmp_path / "gpu", cpu=False, mixed_precision="auto"
    )
    out = train(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["mixed_precision"] == "bf16"
    steps = [m for m in metrics if "step" in m]
    for stage in (1, 2):
        first = [m for m in steps if m["stage"] == stage][0]
        # Reference and policy forwards use the same weights and the same autocast.
        assert abs(first["margin"]) < 1e-3, first
    assert all(m["loss"] == m["loss"] for m in steps), "NaN loss"
    AutoModelForCausalLM.from_pretrained(out / "final")
