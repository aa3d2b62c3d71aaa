"""Sharded training (FSDP2): two CPU processes over gloo reach the one-process run's losses,
negatives and final weights, write full-tensor checkpoints, and resume from them bit for bit;
plus the pieces on one process (the gathered plain copy, tied weights, the refusals)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    command_line,
    fresh_model,
    launch_processes,
    small_run_config,
    small_run_values,
)
from demoalign import IRFTConfig, train
from demoalign.generation import GenerationEngine, SamplingOptions, generate_ids
from demoalign.logprobs import SequenceScorer
from demoalign.sharding import (
    GatheredCopy,
    check_distributed_setup,
    gathered_weights,
    is_sharded,
    plain_model,
)

HERE = Path(__file__).resolve().parent


def _launch_fsdp(tiny_model_dir, out, precision="no", port=29541, **overrides):
    """IRFT under FSDP2 on 2 CPU processes (tests/fsdp_run.py), conftest's small run with its
    global batch of 4 as 2 processes x 1 x accumulation 2 (FSDP2's no-sync path for the first
    micro-batch), a checkpoint at every step."""
    values = small_run_values(IRFTConfig, tiny_model_dir, out, batch_size=1)
    values.update(gradient_accumulation_steps=2, save_steps=1, keep_checkpoints=4)
    values.update(mixed_precision=precision, **overrides)
    flags = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy"]
    flags += ["TRANSFORMER_BASED_WRAP", "--num_processes", "2", "--mixed_precision", precision]
    launch_processes(flags, "fsdp_run.py", ["irft", *command_line(values)], port)


def _records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _steps(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in _records(out) if "loss" in r]


def _negatives(out, stage):
    lines = (Path(out) / "stages" / str(stage) / "negatives.jsonl").read_text().splitlines()
    return [json.loads(x)["negative"] for x in lines]


@pytest.mark.slow
def test_fsdp2_on_two_processes_matches_one_process_and_resumes(tiny_model_dir, tmp_path):
    one = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "one", batch_size=4))
    two = tmp_path / "fsdp"
    _launch_fsdp(tiny_model_dir, two, park_optimizer_state="on")  # sharded state parked too

    assert _records(two)[0]["sharding"] == "FSDP2"
    starts = [r for r in _records(two) if r.get("event") == "stage_start"]
    assert [r["optimizer_state_parked_bytes"] > 0 for r in starts] == [False, True]
    # What the model became, not what the engine was called: its parameters were shards.
    ends = {run: [r for r in _records(run) if r.get("event") == "run_end"] for run in (one, two)}
    assert [r["sharded_parameters"] for r in ends[two]] == [True]
    assert [r["sharded_parameters"] for r in ends[one]] == [False]
    a, b = _steps(one), _steps(two)
    assert len(a) == len(b) == 4
    assert [s[1] for s in b] == pytest.approx([s[1] for s in a], rel=1e-4, abs=1e-5)
    # The grad norm would differ if sharding had untied the tiny model's tied LM head.
    assert [s[2] for s in b] == pytest.approx([s[2] for s in a], rel=1e-3)
    for stage in (1, 2):  # generated from the gathered copy: the same samples
        assert _negatives(two, stage) == _negatives(one, stage)
    final_one, final_two = (load_file(p / "final" / "model.safetensors") for p in (one, two))
    assert sorted(final_one) == sorted(final_two)
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-4, atol=1e-5)

    # Checkpoints hold full tensors keyed by name, not one process's shards.
    state = torch.load(two / "checkpoints" / "4" / "policy.pt", weights_only=True)
    embed = state["model"]["lm.model.embed_tokens.weight"]
    assert embed.shape == final_one["model.embed_tokens.weight"].shape
    assert state["optimizer"]["state"]["lm.model.embed_tokens.weight"]["exp_avg"].shape == (
        embed.shape
    )

    # A crash after step 2: later checkpoints and final/ gone; resume continues bit for bit.
    expected_final, expected_steps = final_two, _steps(two)
    for step in ("3", "4"):
        shutil.rmtree(two / "checkpoints" / step)
    shutil.rmtree(two / "final")
    (two / "run_state.json").write_text(json.dumps({"state": "failed", "method": "irft"}))
    _launch_fsdp(tiny_model_dir, two, resume=True, park_optimizer_state="on")
    assert [r["checkpoint"] for r in _records(two) if r.get("event") == "resume"] == ["2"]
    assert _steps(two) == expected_steps
    resumed = load_file(two / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in expected_final.items())


@pytest.mark.slow
def test_fsdp2_in_bf16_policy_and_reference_agree_at_every_stage_start(tiny_model_dir, tmp_path):
    """bf16 on CPU: FSDP2 computes the policy with bf16 parameters, the stage's reference comes
    from the gathered bf16 copy; at the first step of a stage they are the same weights, so
    the implicit-reward margin is ~0 (a copy in another precision, or stale, would show)."""
    out = tmp_path / "bf16"
    _launch_fsdp(tiny_model_dir, out, precision="bf16", port=29543, keep_checkpoints=0)
    records = _records(out)
    assert records[0]["mixed_precision"] == "bf16"
    assert [r["sharded_parameters"] for r in records if r.get("event") == "run_end"] == [True]
    steps = [r for r in records if "loss" in r]
    for stage in (1, 2):
        first = [r for r in steps if r["stage"] == stage][0]
        assert abs(first["margin"]) < 1e-3, first
    fp32 = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "fp32", batch_size=4))
    expected = [s[1] for s in _steps(fp32)]
    assert [r["loss"] for r in steps] == pytest.approx(expected, rel=1e-2)


@pytest.mark.slow
def test_lora_under_fsdp2_matches_lora_on_one_process(tiny_model_dir, tmp_path):
    """Adapters sharded with their base: the same steps as one process, the stage reference from
    the gathered copy with the adapters merged (margin 0 at each stage start), final/ merged."""
    one = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "one", lora_r=4))
    two = tmp_path / "fsdp_lora"
    _launch_fsdp(tiny_model_dir, two, port=29545, lora_r=4)
    ends = [r for r in _records(two) if r.get("event") == "run_end"]
    assert [r["sharded_parameters"] for r in ends] == [True]
    a, b = _steps(one), _steps(two)
    flat = [x for s in a for x in s[1:]]  # loss and grad norm of every step
    assert [x for s in b for x in s[1:]] == pytest.approx(flat, rel=1e-4, abs=1e-5)
    firsts = [r for r in _records(two) if "loss" in r and r["step"] in (1, 3)]
    assert [abs(r["margin"]) < 1e-5 for r in firsts] == [True, True]
    for stage in (1, 2):
        assert _negatives(two, stage) == _negatives(one, stage)
    final_one, final_two = (load_file(p / "final" / "model.safetensors") for p in (one, two))
    assert sorted(final_two) == sorted(final_one)  # merged: plain names, no lora_ keys
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-4, atol=1e-5)


def test_merging_lora_by_hand_equals_peft_merging(tiny_model_dir):
    from demoalign.lora import add_lora
    from demoalign.sharding import merged_lora_state

    config = SimpleNamespace(lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj")
    model = add_lora(fresh_model(tiny_model_dir), config)
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = merged_lora_state(model, dict(model.state_dict()))
    expected = model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_gathered_plain_copy_is_the_same_model_with_its_weights_still_tied(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    copy = plain_model(model, gathered_weights(model, torch.bfloat16))
    assert copy is not model and not is_sharded(copy)
    assert copy.lm_head.weight is copy.get_input_embeddings().weight
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in copy.parameters())
    exact = plain_model(model, gathered_weights(model))
    ids = torch.tensor([[5, 9, 13, 21, 7]])
    torch.testing.assert_close(exact(ids).logits, model(ids).logits, rtol=0, atol=0)
    # The copy's tensors are its own: training the model afterwards leaves it as it was.
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(exact.lm_head.weight, model.lm_head.weight)


def test_the_scorer_reties_the_head_that_sharded_loading_untied(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    scorer = SequenceScorer(model)
    scorer.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert scorer._no_split_modules == model._no_split_modules


def test_generation_refuses_sharded_parameters(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    next(model.parameters()).ds_id = 0  # what a ZeRO-3 partition carries
    assert is_sharded(model)
    with pytest.raises(ValueError, match="sharded"):
        options = SamplingOptions(max_new_tokens=2, greedy=True)
        generate_ids(GenerationEngine(), model, tokenizer, [[5, 6, 7]], options)


def _accelerator(kind: str, version_or_stage: int, clipping="auto"):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(
        fsdp_version=version_or_stage,
        zero_stage=version_or_stage,
        deepspeed_config={"gradient_clipping": clipping},
    )
    state = SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=plugin)
    return SimpleNamespace(distributed_type=getattr(DistributedType, kind), state=state)


def _setup(method="irft", lora_r=0, accumulation=1, checkpoints=0, max_grad_norm=1.0, park="auto"):
    return SimpleNamespace(
        park_optimizer_state=park,
        method=method,
        lora_r=lora_r,
        lora_keep_adapters=False,
        gradient_accumulation_steps=accumulation,
        keep_checkpoints=checkpoints,
        max_grad_norm=max_grad_norm,
    )


def _keep_adapters():
    config = _setup(lora_r=8)
    config.lora_keep_adapters = True
    return config


@pytest.mark.parametrize(
    "config, accelerator, refused",
    [
        (_setup(), _accelerator("FSDP", 2), None),
        (_setup(lora_r=8, method="rft"), _accelerator("MULTI_GPU", 0), None),
        (_setup(accumulation=4, checkpoints=2), _accelerator("FSDP", 2), None),
        (_setup(), _accelerator("FSDP", 1), "fsdp_version: 2"),
        (_setup(method="rft"), _accelerator("FSDP", 2), "RFT does not run under FSDP2"),
        (_setup(method="sft", lora_r=8), _accelerator("DEEPSPEED", 3), None),
        (_keep_adapters(), _accelerator("FSDP", 2), "lora_keep_adapters under FSDP2"),
        (_setup(lora_r=8), _accelerator("DEEPSPEED", 2), None),  # ZeRO-2: whole parameters
        (_setup(method="rft"), _accelerator("DEEPSPEED", 2), "RFT does not run under DeepSpeed"),
        (_setup(checkpoints=2), _accelerator("DEEPSPEED", 2), "keep_checkpoints=0"),
        (_setup(accumulation=4), _accelerator("DEEPSPEED", 3), "accumulation_steps must be 1"),
        (_setup(), _accelerator("DEEPSPEED", 3, clipping=1.0), None),
        (_setup(), _accelerator("DEEPSPEED", 3, clipping=0.5), "make them equal"),
        (_setup(park="on"), _accelerator("DEEPSPEED", 2), "park_optimizer_state=on does not"),
        (_setup(park="on"), _accelerator("FSDP", 2), None),
    ],
)
def test_what_does_not_run_under_an_engine_is_refused(config, accelerator, refused):
    if refused is None:
        check_distributed_setup(config, accelerator)
    else:
        with pytest.raises(ValueError, match=refused):
            check_distributed_setup(config, accelerator)


def test_the_gathered_copy_is_refreshed_in_place_and_holds_no_memory_between_uses(
    tiny_model_dir,
):
    model = fresh_model(tiny_model_dir)
    holder = GatheredCopy(torch.float32)
    copy = holder.materialise(model)
    tensors = [id(p) for p in copy.parameters()]
    holder.release()
    assert all(p.untyped_storage().nbytes() == 0 for p in copy.parameters())
    with torch.no_grad():  # a training step happens meanwhile
        for p in model.parameters():
            p.mul_(0.5)
    again = holder.materialise(model)
    assert again is copy and [id(p) for p in again.parameters()] == tensors
    for (name, p), q in zip(again.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    assert again.lm_head.weight is again.get_input_embeddings().weight


def test_a_refused_setup_stops_the_run_before_its_folder_exists(
    tiny_model_dir, tmp_path, monkeypatch
):
    import demoalign.sharding

    monkeypatch.setattr(demoalign.sharding, "sharding_of", lambda accelerator: "FSDP1")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        train(small_run_config(IRFTConfig, tiny_model_dir, out))
    assert not out.exists()


def test_on_one_fp32_process_the_gathered_copy_never_shares_the_training_weights(
    tiny_model_dir, tmp_path
):
    script = HERE / "fsdp_one_process.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "rendezvous")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gathered copy ok" in result.stdout


def test_a_sharded_checkpoint_is_not_resumed_by_unsharded_training(tmp_path):
    from demoalign.checkpoint import Checkpoints

    folder = tmp_path / "checkpoints" / "2"
    folder.mkdir(parents=True)
    record = {"step": 2, "processes": 1, "sharded": True, "metrics_bytes": 0, "method": {}}
    (folder / "state.json").write_text(json.dumps(record))
    accelerator = SimpleNamespace(num_processes=1, process_index=0)
    ckpt = Checkpoints(SimpleNamespace(), tmp_path, accelerator, None, resume_from=folder)
    ckpt.register("policy", SimpleNamespace(sharded=False, after_step=None))
    with pytest.raises(ValueError, match="same kind of engine"):
        ckpt.restore()


def test_deepspeed_gets_the_micro_batch_and_clipping_accelerate_would_take_from_a_dataloader():
    from accelerate.utils import DistributedType

    from demoalign.trainer import _fill_deepspeed_batch

    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    _fill_deepspeed_batch(accelerator, SimpleNamespace(batch_size=8, max_grad_norm=0.5))
    assert ds_config == {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5}
