"""IRFT/SPIN: the gradient identity, T = 1 = SPIN, accumulation invariance, one model in memory,
and a whole run end to end."""

import gc
import json
import math
import time
from contextlib import nullcontext

import pytest
import torch
import yaml

from conftest import DOLLY, fresh_model, small_run_config
from demoalign import IRFTConfig, SFTConfig, SPINConfig, train
from demoalign.data import load_examples
from demoalign.encoding import Encoder, collate
from demoalign.generation import QUIET, GenerationEngine, SamplingOptions, generate_ids
from demoalign.logprobs import SequenceScorer
from demoalign.methods import irft as methods
from demoalign.methods.irft import count_pairs, irft_loss_fn, stage_chunks
from demoalign.methods.sft import response_tokens, sft_loss_fn
from demoalign.pairs import Pair, fill_reference_logps, pair_logps
from demoalign.runio import MetricsLog, RunFolderError
from demoalign.trainer import Trainer, disable_dropout, make_accelerator


def make_pairs(model, tokenizer, n=8):
    examples, _ = load_examples(DOLLY, limit=n)
    encoder = Encoder(tokenizer, "instruction", max_length=80, max_prompt_length=40)
    prompts = [encoder.prompt_ids(e) for e in examples]
    with GenerationEngine() as engine:
        negatives = generate_ids(
            engine, model, tokenizer, prompts, SamplingOptions(max_new_tokens=10, seed=0), QUIET
        )
    pairs = []
    for i, e in enumerate(examples):
        demo = encoder.encode(e)
        neg = encoder.fit(prompts[i], negatives[i])
        pairs.append(Pair(demo.prompt_ids, demo.response_ids, neg.response_ids, index=i))
    fill_reference_logps(model, pairs, tokenizer.pad_token_id, 4, nullcontext)
    return pairs, [encoder.encode(e) for e in examples]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_type, factor", [("sigmoid", 0.5), ("hinge", 1.0), ("linear", 1.0)])
def test_first_step_gradient_is_the_ml_irl_gradient(tiny_model_dir, tokenizer, loss_type, factor):
    """At θ = π_t, ∇L = −(β·factor)[∇log π(y|x) − ∇log π(ỹ|x)], factor ½ for sigmoid
    (docs/algorithms.md §2)."""
    model = fresh_model(tiny_model_dir)
    disable_dropout(model)
    pad = tokenizer.pad_token_id
    pairs, _ = make_pairs(model, tokenizer)
    beta = 0.3
    model.train()
    losses, stats, _ = irft_loss_fn(beta, loss_type, 0.0, pad)(model, pairs)
    assert torch.allclose(stats["margin"], torch.zeros(len(pairs)), atol=1e-5), (
        "u must be 0 at the stage start"
    )
    losses.mean().backward()
    ours = grads(model)
    model.zero_grad()
    demo, neg, _, _ = pair_logps(model, pairs, pad)
    (-(beta * factor) * (demo - neg).mean()).backward()
    expected = grads(model)
    assert ours.abs().max() > 1e-4
    assert torch.allclose(ours, expected, atol=1e-6, rtol=1e-4)


def _trainer(tiny_model_dir, tmp_path, **overrides):
    config = small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "unused", **overrides)
    model = fresh_model(tiny_model_dir)
    return Trainer(
        config, model, make_accelerator(config), MetricsLog(tmp_path / "m.jsonl", enabled=False)
    )


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_batch1_accumulation8_equals_batch8(tiny_model_dir, tokenizer, tmp_path):
    pairs, sft_items = make_pairs(fresh_model(tiny_model_dir), tokenizer)
    pad = tokenizer.pad_token_id
    runs = {}
    # Micro-batches cut by tokens (micro_batch_size=N), padded and packed; auto is fixed on CPU.
    variants = {
        "8x1": dict(batch_size=8),
        "1x8": dict(batch_size=1, gradient_accumulation_steps=8),
        "2x4": dict(batch_size=2, gradient_accumulation_steps=4),
        "tokens": dict(batch_size=2, gradient_accumulation_steps=4, micro_batch_size="400"),
        "tokens-packed": dict(batch_size=8, micro_batch_size="300", padding_free="true"),
        "auto": dict(batch_size=2, gradient_accumulation_steps=4, micro_batch_size="auto"),
    }
    for name, overrides in variants.items():
        trainer = _trainer(tiny_model_dir, tmp_path, **overrides)
        assert trainer.global_batch == 8
        cut = len(trainer._my_micro_batches(pairs)[0])
        assert cut == {"8x1": 1, "1x8": 8, "2x4": 4, "auto": 4}.get(name, cut)
        if name.startswith("tokens"):
            assert 1 < cut < 8 and trainer.levers.micro_batch_tokens, name
        records = [
            trainer.step(pairs, irft_loss_fn(0.5, "sigmoid", 0.2, pad), count_pairs(pairs))
            for _ in range(3)
        ]
        # SFT's per-token normalisation must hold across micro-batches too.
        records += [
            trainer.step(sft_items, sft_loss_fn(pad), response_tokens(sft_items)) for _ in range(2)
        ]
        runs[name] = (
            [r["loss"] for r in records],
            [r["grad_norm"] for r in records],
            _params(trainer.unwrapped),
        )
    ref_losses, ref_norms, ref_params = runs["8x1"]
    assert ref_losses[1] != ref_losses[0], "the optimiser must have moved"
    for name in variants:
        losses, norms, params = runs[name]
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), name
        # Adam is blind to a constant loss scale, so the accumulated gradient itself is compared
        # too.
        assert norms == pytest.approx(ref_norms, rel=1e-4), name
        # Adam turns float-rounding differences of near-zero gradients into ~1e-5 moves at lr 1e-3.
        assert (params - ref_params).abs().max() < 1e-4, (name, (params - ref_params).abs().max())


def _final_params(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_irft_with_one_stage_is_one_spin_iteration(tiny_model_dir, tmp_path):
    irft = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "irft", stages=1))
    spin = train(small_run_config(SPINConfig, tiny_model_dir, tmp_path / "spin", iterations=1))
    negs = [(d / "stages" / "1" / "negatives.jsonl").read_text() for d in (irft, spin)]
    assert negs[0] == negs[1]
    a, b = _final_params(irft), _final_params(spin)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = fresh_model(tiny_model_dir).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed nothing"


def test_no_second_model_is_held_during_irft(tiny_model_dir, tmp_path, monkeypatch):
    """During every training step, the live nn.Parameters add up to ONE model's weights."""
    model_size = sum(p.numel() for p in fresh_model(tiny_model_dir).parameters())
    gc.collect()
    counts = []
    real = methods.irft_loss_fn

    def counting_loss_fn(*args, **kwargs):
        inner = real(*args, **kwargs)

        def loss_fn(model, pairs):
            gc.collect()
            live = {
                o.data_ptr(): o.numel()
                for o in gc.get_objects()
                if isinstance(o, torch.nn.Parameter)
            }
            counts.append(sum(live.values()) / model_size)
            return inner(model, pairs)

        return loss_fn

    monkeypatch.setattr(methods, "irft_loss_fn", counting_loss_fn)
    train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "run"))
    assert counts, "the loss was never called"
    assert set(counts) == {1.0}, f"live parameters during training steps, in model sizes: {counts}"


def test_end_to_end_two_stages_writes_every_output(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    out = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "run", stages=2))
    assert time.perf_counter() - started < 60

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "irft" and config["stages"] == 2
    for stage in ("1", "2"):
        records = [
            json.loads(line)
            for line in (out / "stages" / stage / "negatives.jsonl").read_text().splitlines()
        ]
        assert len(records) == 8
        for r in records:
            assert {
                "prompt",
                "demonstration",
                "negative",
                "ref_logp_demonstration",
                "ref_logp_negative",
            } <= set(r)
            assert r["ref_logp_demonstration"] < 0 and r["ref_logp_negative"] <= 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "step" in m]
    assert len(steps) == 4  # 2 stages x 8 pairs / batch 4
    for key in (
        "loss",
        "pair_accuracy",
        "margin",
        "reward_demo",
        "reward_negative",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert all(key in m for m in steps), key
    first_of_stage = [m for m in steps if m["stage"] == 2][0]
    assert first_of_stage["margin"] == pytest.approx(0, abs=1e-5), (
        "stage 2 must start from its own reference"
    )
    assert sum(m["event"] == "stage_start" for m in metrics if "event" in m) == 2
    assert "prompts_truncated" in metrics[-1]

    # final/ is a plain checkpoint: transformers' own greedy decoding of it and the package's
    # give the same tokens (up to the first EOS), and training moved it away from the start.
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("### Instruction: hi\n\n### Response: ")["input_ids"]
    hf = model.generate(
        torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
    )[0, len(ids) :].tolist()
    greedy = SamplingOptions(max_new_tokens=8, greedy=True)
    with GenerationEngine() as engine:
        ours = generate_ids(engine, model, tok, [ids], greedy, QUIET)[0]
    assert hf[: len(ours)] == ours and len(ours) >= 1
    start = fresh_model(tiny_model_dir).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())

    with pytest.raises(RunFolderError, match="overwrite"):
        train(small_run_config(IRFTConfig, tiny_model_dir, out))
    again = train(small_run_config(IRFTConfig, tiny_model_dir, out, overwrite=True, stages=1))
    assert not (again / "stages" / "2").exists(), "overwrite must not leave the old run's files"


def test_sft_run(tiny_model_dir, tmp_path):
    out = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "sft", epochs=2))
    steps = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"step"' in line
    ]
    assert len(steps) == 8
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert not (out / "stages").exists()


def test_sft_weight_adds_the_per_token_nll_of_the_demonstration(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    pad = tokenizer.pad_token_id
    pairs, _ = make_pairs(model, tokenizer, n=4)
    with torch.no_grad():
        plain, _, _ = irft_loss_fn(0.1, "sigmoid", 0.0, pad)(model, pairs)
        mixed, _, _ = irft_loss_fn(0.1, "sigmoid", 0.7, pad)(model, pairs)
        demo, _, demo_tokens, _ = pair_logps(model, pairs, pad)
    assert torch.allclose(mixed - plain, 0.7 * (-demo) / demo_tokens, atol=1e-5)
    assert (mixed - plain).min() > 0


def test_stage_chunks_are_disjoint_cover_the_data_and_reshuffle_per_iteration():
    chunks = stage_chunks(103, 4, seed=3, iteration=0)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(103))
    assert [len(c) for c in chunks] == [25, 26, 26, 26]
    assert stage_chunks(103, 4, seed=3, iteration=1) != chunks
    assert stage_chunks(103, 4, seed=3, iteration=0) == chunks


def test_static_engine_and_decode_reference_logps_give_the_hf_forward_stage(
    tiny_model_dir, tmp_path
):
    """Greedy negatives of the static engine equal hf's, with prompts that leave less room than
    max_new_tokens (negatives cut to fit); decode-time reference log-probs of the kept tokens equal
    the reference forward's in fp32, and the demonstrations' come from the forward as before."""
    stages = {}
    for name, extra in {
        "hf": dict(generation_backend="hf"),
        "static": dict(
            generation_backend="static", reference_logps="decode", generation_batch_size="auto"
        ),
    }.items():
        config = small_run_config(
            IRFTConfig,
            tiny_model_dir,
            tmp_path / name,
            greedy=True,
            data="task:sort",
            max_length=40,
            max_prompt_length=32,
            max_new_tokens=30,
            stages=1,
            **extra,
        )
        out = train(config)
        negatives = out / "stages" / "1" / "negatives.jsonl"
        stages[name] = [json.loads(line) for line in negatives.open()]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        start = [m for m in metrics if m.get("event") == "stage_start"][0]
        assert start["negatives_truncated"] > 0, "no prompt left less room than max_new_tokens"
    hf, static = stages["hf"], stages["static"]
    assert [r["negative"] for r in static] == [r["negative"] for r in hf]
    for a, b in zip(hf, static):
        assert b["ref_logp_demonstration"] == pytest.approx(a["ref_logp_demonstration"], abs=1e-5)
        tolerance = 1e-4 * b["negative_tokens"]
        assert b["ref_logp_negative"] == pytest.approx(a["ref_logp_negative"], abs=tolerance)


def test_negatives_come_from_the_stage_start_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Stage 1 samples from the initial weights, stage 2 from the weights at the end of stage 1:
    not the initial model, not a stale copy."""
    from demoalign.methods import negatives

    seen, stage_ends = [], {}
    real = negatives.generate_ids

    def recording(engine, model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(engine, model, *args, **kwargs)

    def on_stage_end(model, stage):
        stage_ends[stage] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(negatives, "generate_ids", recording)
    train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "run"), on_stage_end)
    start = fresh_model(tiny_model_dir).state_dict()
    assert len(seen) == 2
    assert all(torch.equal(seen[0][k], start[k]) for k in start)
    assert all(torch.equal(seen[1][k], stage_ends[1][k]) for k in start)
    assert not all(torch.equal(seen[1][k], start[k]) for k in start)


def test_the_irft_loss_is_a_mean_over_pairs(tiny_model_dir, tmp_path):
    """At the first step of every stage u = 0, so each pair's sigmoid loss is log 2: the logged
    loss is log 2 only if it is normalised by pairs (a token mean would be far smaller)."""
    out = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "run"))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"loss"' in line]
    firsts = [next(m for m in steps if m["stage"] == stage) for stage in (1, 2)]
    assert [m["loss"] for m in firsts] == pytest.approx([math.log(2)] * 2, abs=1e-5)


def test_the_sft_loss_is_a_token_mean_over_the_global_batch(tiny_model_dir, tokenizer):
    """One step of batch 2 x accumulation 2: the logged loss is the summed NLL of all response
    tokens of the 4 examples over their token count, not a mean of per-example means."""
    from demoalign.data import Example
    from demoalign.logprobs import model_sequence_logps

    examples = [
        Example("a", "b"),
        Example("hello there", "a much longer answer, with words"),
        Example("x", "yes"),
        Example("sort 3 1 2", "1 2 3"),
    ]
    encoder = Encoder(tokenizer, "plain", 64, 32)
    items = [encoder.encode(e) for e in examples]
    model = fresh_model(tiny_model_dir)
    disable_dropout(model)
    with torch.no_grad():
        batch = collate(items, tokenizer.pad_token_id)
        logps, tokens = model_sequence_logps(SequenceScorer(model).eval(), batch)
    expected = -logps.sum().item() / tokens.sum().item()
    per_example = (-logps / tokens).mean().item()
    assert abs(expected - per_example) > 1e-3, "pick examples whose lengths differ"
    config = small_run_config(
        SFTConfig, tiny_model_dir, "unused", batch_size=2, gradient_accumulation_steps=2
    )
    trainer = Trainer(config, model, make_accelerator(config), MetricsLog("x", enabled=False))
    trainer.start_schedule(1)
    record = trainer.step(items, sft_loss_fn(tokenizer.pad_token_id), response_tokens(items))
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
