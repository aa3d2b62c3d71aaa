"""GPU path (bf16 autocast on CUDA). Skipped cleanly where there is no GPU, as in CI."""

import importlib.util
import json

import pytest
import torch

from conftest import read_metrics, small_run_config
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
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    # park_optimizer_state=auto parks on CUDA: stage 2 finds AdamW's two fp32 moments.
    starts = [m for m in metrics if m.get("event") == "stage_start"]
    n_params = sum(p.numel() for p in final.parameters())
    assert [m["optimizer_state_parked_bytes"] for m in starts] == [0, 8 * n_params]


def test_parking_the_optimiser_state_on_gpu_changes_nothing(tiny_model_dir, tmp_path):
    """The pinned host round trip on CUDA (non-blocking copies, one synchronise): the same steps
    with and without it."""
    runs = {}
    for park in ("on", "off"):
        config = small_run_config(
            IRFTConfig,
            tiny_model_dir,
            tmp_path / park,
            cpu=False,
            mixed_precision="auto",
            park_optimizer_state=park,
        )
        steps = [m for m in read_metrics(train(config)) if "loss" in m]
        runs[park] = [m[key] for m in steps for key in ("loss", "grad_norm")]
    # Not bit for bit: CUDA's embedding backward adds with atomics, in any order.
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-5, abs=1e-6)


def test_static_engine_on_gpu_compiles_once_and_frees_its_copy(tiny_model_dir):
    """The fast engine on CUDA: a bf16 copy refreshed from the fp32 weights at every call and
    freed after it, decode-time log-probs close to a bf16 forward, and no second compile."""
    from transformers import AutoTokenizer

    from conftest import fresh_model
    from demoalign.generation import QUIET, GenerationEngine, SamplingOptions, generate_ids
    from demoalign.logprobs import token_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = fresh_model(tiny_model_dir).cuda()
    texts = ("Hello", "### Instruction: sort 3 1 2\n\n### Response: ")
    prompts = [tokenizer(p)["input_ids"] for p in texts]
    options = SamplingOptions(max_new_tokens=16, batch_size=4, seed=0, backend="static")
    generation_engine = GenerationEngine()
    out, logps = generate_ids(
        generation_engine, model, tokenizer, prompts, options, QUIET, return_logps=True
    )
    engine = generation_engine.static_engine(model)
    assert engine.half, "no bf16 copy"
    assert engine.released, "the copy was not freed"
    assert engine.compile, "compile failed (see the message above)"
    assert hasattr(engine.model, "_compiled_call"), "transformers did not take its compiled path"
    assert all(p.untyped_storage().nbytes() == 0 for p in engine.model.parameters())
    copy = engine.model
    for i, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + out[i]], device="cuda")
        labels = seq.clone()
        labels[0, : len(prompt)] = -100
        engine.refresh()
        with torch.no_grad():
            forward = token_logps(copy(seq).logits, labels)[0, len(prompt) - 1 :].cpu()
        assert (forward - torch.tensor(logps[i])).abs().max() < 0.1
    engine.release()

    # A "training step" changes the weights: the next call must see them, without recompiling.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate_ids(generation_engine, model, tokenizer, prompts, options, QUIET)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "recompiled"
    engine.refresh()
    for dst, src in zip(engine.model.parameters(), model.parameters()):
        assert torch.equal(dst, src.detach().to(dst.dtype))
    engine.release()
    generation_engine.close()
    assert engine.model is None, "close kept the copy"
    assert not hasattr(copy, "_compiled_call"), "close kept the compiled decode step"


def test_a_second_model_of_the_same_architecture_reuses_the_compiled_engine(tiny_model_dir):
    """A sweep of runs in one process: the next model adopts the released bf16 copy and its
    compiled decode step, so generating from it compiles nothing new."""
    from transformers import AutoTokenizer

    from conftest import fresh_model
    from demoalign.generation import QUIET, GenerationEngine, SamplingOptions, generate_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in ("Hello", "sort 3 1 2")]
    options = SamplingOptions(max_new_tokens=16, batch_size=4, seed=0, backend="static")
    with GenerationEngine() as generation_engine:
        first = fresh_model(tiny_model_dir).cuda()
        generate_ids(generation_engine, first, tokenizer, prompts, options, QUIET)
        engine = generation_engine.static_engine(first)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        generation_engine.finish(first)  # the first run is over
        del first
        second = fresh_model(tiny_model_dir).cuda()
        with torch.no_grad():  # other weights than the first model's
            for p in second.parameters():
                p.mul_(0.5)
        generate_ids(generation_engine, second, tokenizer, prompts, options, QUIET)
        assert generation_engine.static_engine(second) is engine, "a new engine was built"
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "recompiled"
        engine.refresh()
        for dst, src in zip(engine.model.parameters(), second.parameters()):
            assert torch.equal(dst, src.detach().to(dst.dtype))
        engine.release()


def test_rft_kl_is_zero_at_the_first_policy_step_in_bf16(tiny_model_dir, tmp_path):
    """The policy's log-probs (under autocast in the loss), the reference's and the rewards are
    taken in one precision: at the first policy step π = π_ref, so the logged KL is ~0 (it was
    about −0.9 nats per 256-token sequence when the reference ran outside autocast)."""
    from demoalign import RFTConfig
    from demoalign.config import build_config

    config = build_config(
        RFTConfig,
        dict(
            model=str(tiny_model_dir),
            data="task:sort",
            max_examples=16,
            template="plain",
            output_dir=str(tmp_path / "rft"),
            cpu=False,
            mixed_precision="auto",
            outer_iterations=1,
            reward_steps=1,
            policy_steps=1,
            rollouts=2,
            batch_size=4,
            max_length=48,
            max_prompt_length=24,
            max_new_tokens=16,
            generation_batch_size=8,
            show_progress=False,
        ),
    )
    out = train(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["mixed_precision"] == "bf16"
    first = [m for m in metrics if m.get("phase") == "policy"][0]
    assert abs(first["kl"]) < 0.02, first


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_irft_under_fsdp2_on_one_gpu(tiny_model_dir, tmp_path, precision):
    """accelerate's own FSDP2 on CUDA, one process: the run takes the sharded paths (the gathered
    generation copy, full-tensor checkpoints and final/), and in fp32 it takes the steps of the
    same run without FSDP (one process: the gathered copy is the shard's own size, where a copy
    sharing its storage once freed the training weights)."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from conftest import DOLLY

    runner = Path(__file__).resolve().parent / "ddp_run.py"
    out = tmp_path / "fsdp"
    args = [f"model={tiny_model_dir}", f"data={DOLLY}", "max_examples=16", "max_length=80"]
    args += ["max_prompt_length=40", "batch_size=4", "max_new_tokens=10", "stages=2"]
    args += ["save_steps=2", "show_progress=false", f"mixed_precision={precision}", "cpu=false"]
    args += ["padding_free=true"]
    # The launcher's module, not its console script: a system Python may put that elsewhere.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version"]
    cmd += ["2", "--num_processes", "1", "--mixed_precision", precision]
    cmd += ["--main_process_port", "29551", str(runner), "irft", f"output_dir={out}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["sharding"] == "FSDP2" and metrics[0]["mixed_precision"] == precision
    assert metrics[0]["padding_free"] is True  # packed batches under FSDP2
    assert [m["sharded_parameters"] for m in metrics if m.get("event") == "run_end"] == [True]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(loss == loss for loss in losses), "NaN loss"
    assert (out / "checkpoints").is_dir()
    AutoModelForCausalLM.from_pretrained(out / "final")
    if precision == "no":
        from demoalign.config import CONFIGS, load_config

        overrides = [f"output_dir={tmp_path / 'plain'}", *args]
        plain = train(load_config(CONFIGS["irft"], None, overrides))
        expected = [m["loss"] for m in read_metrics(plain) if "loss" in m]
        assert losses == pytest.approx(expected, rel=1e-3, abs=1e-4)


@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed"
)
def test_liger_kernels_give_the_plain_paths_loss_and_gradients_in_bf16(tiny_model_dir, tokenizer):
    from test_padding_free import make_pairs

    from conftest import fresh_model
    from demoalign.kernels import apply_liger
    from demoalign.logprobs import SequenceScorer
    from demoalign.methods.irft import irft_loss_fn
    from demoalign.pairs import fill_reference_logps

    pad = tokenizer.pad_token_id
    pairs, _ = make_pairs(tokenizer, 4)
    results = []
    for liger in (False, True):
        model = fresh_model(tiny_model_dir).cuda()
        if liger:
            assert apply_liger(model) == "llama"
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        fill_reference_logps(model, pairs, pad, 4, autocast)
        scorer = SequenceScorer(model, padding_free=True)
        with autocast():
            losses, _, _ = irft_loss_fn(0.1, "sigmoid", 0.5, pad)(scorer, pairs)
        losses.sum().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results.append((losses.detach().float(), grads))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=2e-2)
    assert (grad_b - grad_a).norm() <= 5e-2 * grad_a.norm()
