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
    from demoalign.config import build_config

    return build_config(cls, values)
