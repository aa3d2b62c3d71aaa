"""LoRA for SFT, SPIN and IRFT: only the adapters train, the loss falls like full fine-tuning's,
final/ is a plain merged model (and final_adapters/ the peft adapters on request), and an IRFT
stage's reference is the stage-start adapted model (u = 0 at the first step of every stage)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import read_metrics, small_run_config
from demoalign import IRFTConfig, SFTConfig, SPINConfig, train
from demoalign import run as run_module
from demoalign.runio import read_run_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _capture_unmerged(monkeypatch) -> dict:
    """Patch the final save to keep a copy of the trained, still un-merged model's weights."""
    seen = {}
    real = run_module._save_final

    def spy(config, model, *rest):
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return real(config, model, *rest)

    monkeypatch.setattr(run_module, "_save_final", spy)
    return seen


def _base_key(key: str) -> str | None:
    """The plain model's name of a peft base weight (`base_layer` is peft's wrapped Linear);
    None for an adapter weight."""
    if "lora_" in key:
        return None
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


CASES = [
    (SFTConfig, dict(epochs=2)),
    (SPINConfig, dict(iterations=1)),
    (IRFTConfig, dict(generation_backend="static")),  # the static engine on a peft model
]


@pytest.mark.parametrize("cls, extra", CASES, ids=[c[0].method for c in CASES])
def test_only_adapters_change_and_final_is_merged(
    tiny_model_dir, tmp_path, monkeypatch, cls, extra
):
    seen = _capture_unmerged(monkeypatch)
    config = small_run_config(cls, tiny_model_dir, tmp_path / "run", lora_r=4, **extra)
    config.learning_rate = 1e-2
    out = train(config)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    state = seen["state"]
    adapters = [k for k in state if _base_key(k) is None]
    assert adapters and seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    bases = {_base_key(k): v for k, v in state.items() if _base_key(k) is not None}
    assert set(bases) == set(start), "every base weight is in the adapted model"
    assert all(torch.equal(bases[k], start[k]) for k in start), "a base weight changed"
    assert any(k.endswith("lora_B.default.weight") and state[k].abs().sum() > 0 for k in state), (
        "the adapters (B starts at 0) must train"
    )
    final = load_file(str(out / "final" / "model.safetensors"))
    assert not any("lora" in k for k in final), "final/ must be a plain merged model"
    assert any(not torch.equal(final[k], start[k]) for k in final if k in start)
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert not (out / "final_adapters").exists()
    assert read_run_state(out)["state"] == "finished"


def _epoch_means(out: Path) -> list[float]:
    steps = [r for r in read_metrics(out) if "loss" in r]
    epochs = sorted({r["epoch"] for r in steps})
    losses = [[r["loss"] for r in steps if r["epoch"] == e] for e in epochs]
    return [sum(values) / len(values) for values in losses]


def test_lora_loss_falls_like_full_fine_tuning(tiny_model_dir, tmp_path):
    """SFT, 4 epochs of 4 steps: the mean loss of each epoch falls, with LoRA as without."""
    means = {}
    for name, extra in (("full", dict(learning_rate=1e-3)), ("lora", dict(lora_r=8))):
        config = small_run_config(
            SFTConfig, tiny_model_dir, tmp_path / name, epochs=4, keep_checkpoints=0, **extra
        )
        if name == "lora":
            config.learning_rate = 1e-2
        means[name] = _epoch_means(train(config))
    for name, curve in means.items():
        assert all(b < a for a, b in zip(curve, curve[1:])), f"{name}: {curve}"
    drop = {name: curve[0] - curve[-1] for name, curve in means.items()}
    assert drop["lora"] > 0.05 * drop["full"], drop


def test_irft_lora_reference_is_the_stage_start_adapted_model(tiny_model_dir, tmp_path):
    """Each stage's reference log-probs come from the adapted model at the stage start: the first
    step of every stage has margin 0, later steps do not, and the next stage's reference
    differs from the first (the adapters moved)."""
    config = small_run_config(
        IRFTConfig,
        tiny_model_dir,
        tmp_path / "run",
        lora_r=4,
        epochs_per_stage=2,
        lora_keep_adapters=True,
    )
    config.learning_rate = 1e-2
    out = train(config)
    records = read_metrics(out)
    steps = [r for r in records if "margin" in r]
    for stage in (1, 2):
        mine = [r for r in steps if r["stage"] == stage]
        assert mine[0]["margin"] == pytest.approx(0, abs=1e-5), f"stage {stage}"
        assert abs(mine[-1]["margin"]) > 1e-4, f"stage {stage} must train"
    starts = [r for r in records if r.get("event") == "stage_start"]
    assert len(starts) == 2
    # final_adapters/: base + adapters, merged by peft, equal final/.
    from peft import PeftModel

    adapters = out / "final_adapters"
    assert (adapters / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, adapters).merge_and_unload().state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.allclose(merged[k], final[k], atol=1e-6) for k in final)


def test_unknown_target_modules_fail_before_the_folder_exists(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = small_run_config(SFTConfig, tiny_model_dir, out, lora_r=4)
    config.lora_target_modules = "no_such_proj"
    with pytest.raises(ValueError, match="no_such_proj"):
        train(config)
    assert not out.exists()
    with pytest.raises(ValueError, match="lora_alpha"):
        small_run_config(SFTConfig, tiny_model_dir, out, lora_r=4, lora_alpha=0)
