from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("DEMOALIGN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
DOLLY = SHARED_DATA / "dolly_hhrlhf" / "dolly_hhrlhf_train_small.jsonl"
os.environ["DEMOALIGN_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from demoalign.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", vocab_size=384, hidden_size=32
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "right"
    return tok


def fresh_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def small_run_config(cls, tiny_model_dir, out, **overrides):
    """A config for a run of a few seconds on CPU."""
    from demoalign.config import build_config

    return build_config(cls, small_run_values(cls, tiny_model_dir, out, **overrides))


def small_run_values(cls, tiny_model_dir, out, **overrides) -> dict:
    """The settings of `small_run_config`, as `key: value` pairs (see `command_line`)."""
    values = dict(
        model=str(tiny_model_dir),
        data=str(DOLLY),
        max_examples=16,
        output_dir=str(out),
        max_length=80,
        max_prompt_length=40,
        batch_size=4,
        learning_rate=1e-3,
        cpu=True,
        show_progress=False,
    )
    if cls.method != "sft":
        values.update(max_new_tokens=10, generation_batch_size=8, stages=2)
    values.update(overrides)
    if cls.method == "spin":
        values.pop("stages", None)
    return values


def command_line(values: dict) -> list[str]:
    """`key=value` arguments, as `demoalign <method>` and the launched test runners take them."""
    return [f"{key}={value}" for key, value in values.items()]


def launch_processes(flags: list[str], script: str, args: list[str], port: int, env=None, ok=True):
    """`accelerate launch FLAGS tests/SCRIPT ARGS` on CPU, one thread per process; the finished
    process (its return code asserted to be 0 unless `ok` is False)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(port)]
    cmd += [str(Path(__file__).resolve().parent / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def small_rft_values(tiny_model_dir, out, **overrides) -> dict:
    """RFT settings of a run of a few seconds on CPU (two outer iterations on the sort task), as
    `key: value` pairs: for build_config, or for the command line."""
    values = dict(
        model=str(tiny_model_dir),
        data="task:sort",
        max_examples=16,
        output_dir=str(out),
        template="plain",
        max_length=48,
        max_prompt_length=24,
        max_new_tokens=12,
        batch_size=4,
        generation_batch_size=16,
        learning_rate=1e-3,
        reward_learning_rate=3e-3,
        reward_steps=4,
        policy_steps=2,
        rollouts=2,
        outer_iterations=2,
        cpu=True,
        show_progress=False,
    )
    values.update(overrides)
    return values


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster on a shared CPU, and the same thread count in
    every run (and subprocess) keeps the arithmetic identical."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_metrics(folder) -> list[dict]:
    """The records of a run folder's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


class CharTokenizer:
    """One id per character, BOS = 1 prepended, EOS = 2: lengths are easy to reason about."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}
