"""The training levers as a run sees them: padding_free, kernels and compile_training chosen
before the run folder is taken, refused clearly where they cannot work, and written into
run_start."""

import subprocess
import sys

import pytest
import torch

import demoalign.kernels as kernels
from conftest import command_line, read_metrics, small_run_config, small_run_values
from demoalign import IRFTConfig, train


def test_kernels_choice_on_each_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not kernels.use_liger("auto", cpu)
    assert not kernels.use_liger("none", cuda)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        kernels.use_liger("liger", cpu)
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert not kernels.use_liger("auto", cuda)
    with pytest.raises(ValueError, match=r"pip install 'demoalign\[kernels\]'"):
        kernels.use_liger("liger", cuda)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.use_liger("auto", cuda) and kernels.use_liger("liger", cuda)


def test_a_padding_free_run_records_its_levers_and_trains_as_the_padded_one(
    tiny_model_dir, tmp_path
):
    runs = {}
    for padding_free in ("false", "true"):
        out = tmp_path / padding_free
        train(small_run_config(IRFTConfig, tiny_model_dir, out, padding_free=padding_free))
        runs[padding_free] = read_metrics(out)
    for setting, records in runs.items():
        assert records[0]["event"] == "run_start"
        assert records[0]["padding_free"] is (setting == "true")
        assert records[0]["kernels"] == "none"  # CPU: auto is none
        assert records[0]["compile_training"] is False  # CPU: auto does not compile
    steps = {k: [r for r in v if "step" in r] for k, v in runs.items()}
    # The first step of each stage: u = 0 on both paths (the reference took the same path).
    for records in steps.values():
        for stage in (1, 2):
            assert abs([r for r in records if r["stage"] == stage][0]["margin"]) < 1e-4
    # The first step starts from the same weights: same loss up to float rounding.
    assert steps["true"][0]["loss"] == pytest.approx(steps["false"][0]["loss"], abs=1e-5)


def test_kernels_liger_on_the_cpu_is_one_error_line_and_no_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    values = small_run_values(IRFTConfig, tiny_model_dir, out, kernels="liger")
    cmd = [sys.executable, "-m", "demoalign", "irft", *command_line(values)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: kernels=liger needs a CUDA GPU")
    assert not out.exists()


def test_micro_batches_cut_by_tokens():
    from demoalign.encoding import Tokenized
    from demoalign.microbatch import split_by_tokens

    items = [Tokenized([1] * 3, [2] * n) for n in (2, 5, 1, 9, 3)]  # 5, 8, 4, 12, 6 tokens
    packed = split_by_tokens(items, 13, padding_free=True)
    assert [[len(t.response_ids) for t in mb] for mb in packed] == [[2, 5], [1], [9], [3]]
    padded = split_by_tokens(items, 16, padding_free=False)  # rows x longest
    assert [[len(t.response_ids) for t in mb] for mb in padded] == [[2, 5], [1], [9], [3]]
    assert sum(packed, []) == items  # every item once, in order
    assert split_by_tokens(items, 1, padding_free=True) == [[t] for t in items]  # one each
    assert split_by_tokens([object()], 100, padding_free=True) is None  # split by count instead
