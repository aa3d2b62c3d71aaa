"""RFT: the reward step (held-out margin, the linear loss's gradient = the contrastive estimator,
preference pairs), the RLOO policy step's convergence to π_ref·exp(r/β)/Z on an enumerable
problem, and a whole T = 2 run end to end."""

import json
import re

import pytest
import torch
import yaml

from conftest import DOLLY, fresh_model, small_rft_values
from demoalign import RFTConfig, train
from demoalign.config import build_config
from demoalign.data import DataError
from demoalign.data.tasks import task_examples
from demoalign.encoding import Encoder, Tokenized
from demoalign.generation import QUIET, GenerationEngine, SamplingOptions, generate_ids
from demoalign.methods.reward_model import (
    RewardScorer,
    evaluate_reward_pairs,
    reward_loss_fn,
    reward_step,
)
from demoalign.methods.rloo import PolicyPhase, Rollouts, policy_step, sequence_logps_of
from demoalign.methods.sft import sft_loss_fn
from demoalign.models import load_reward_model as load_reward_model_from
from demoalign.pairs import Pair
from demoalign.runio import MetricsLog
from demoalign.trainer import Trainer, make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread")


def load_reward_model(config, tokenizer):
    """RFT's reward model of `config`, as the run builds it."""
    path = config.reward_model or config.model
    return load_reward_model_from(path, same_ids_as=tokenizer, seed=config.seed)[0]


def rft_config(tiny_model_dir, out, **overrides):
    return build_config(RFTConfig, small_rft_values(tiny_model_dir, out, **overrides))


def reward_trainer(config, tokenizer, tmp_path):
    from dataclasses import replace

    reward_config = replace(config, learning_rate=config.reward_learning_rate)
    log = MetricsLog(tmp_path / "unused.jsonl", enabled=False)
    return Trainer(
        reward_config,
        load_reward_model(config, tokenizer),
        make_accelerator(config),
        log,
        wrapper=RewardScorer,
    )


def sort_pairs(tiny_model_dir, tokenizer, n, seed=0):
    """(demonstration, negative sampled from the untrained tiny model) pairs on the sort task."""
    encoder = Encoder(tokenizer, "plain", 48, 24)
    examples = task_examples("sort", n, seed=seed)
    prompts = [encoder.prompt_ids(e) for e in examples]
    with GenerationEngine() as engine:
        negatives = generate_ids(
            engine,
            fresh_model(tiny_model_dir),
            tokenizer,
            prompts,
            SamplingOptions(max_new_tokens=12, seed=seed),
            QUIET,
        )
    return [
        Pair(p, encoder.response_ids(e.response), negatives[i] or [tokenizer.eos_token_id])
        for i, (p, e) in enumerate(zip(prompts, examples))
    ]


def test_reward_step_raises_the_margin_on_its_pairs_and_on_held_out_pairs(
    tiny_model_dir, tokenizer, tmp_path
):
    config = rft_config(tiny_model_dir, tmp_path / "unused")
    trainer = reward_trainer(config, tokenizer, tmp_path)
    scorer = trainer.accelerator.unwrap_model(trainer.model)
    pad = tokenizer.pad_token_id
    train_pairs, held = (
        sort_pairs(tiny_model_dir, tokenizer, 24, seed=0),
        sort_pairs(tiny_model_dir, tokenizer, 16, seed=9),
    )
    before = [evaluate_reward_pairs(scorer, p, pad, 16) for p in (train_pairs, held)]
    trainer.start_schedule(12)
    records = reward_step(trainer, train_pairs, [], 12, reward_loss_fn("logistic", pad), (0,), {})
    after = [evaluate_reward_pairs(scorer, p, pad, 16) for p in (train_pairs, held)]
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"]
    for b, a in zip(before, after):  # training pairs, then pairs the reward model never saw
        assert a["margin"] > b["margin"] + 0.5, (b, a)
        assert a["accuracy"] >= 0.9, a


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_linear_reward_loss_gradient_is_the_contrastive_estimator(
    tiny_model_dir, tokenizer, tmp_path
):
    """docs/algorithms.md §1: ∇ℓ = (1/β) E[∇r(x,y) − ∇r(x,ỹ)]. The linear loss −(r(y) − r(ỹ)),
    meaned over a batch,
    must have gradient −β ĝ, with ĝ computed here pair by pair from the model's own (unpadded)
    forward, which pools at the last token."""
    config = rft_config(tiny_model_dir, tmp_path / "unused")
    model = load_reward_model(config, tokenizer)
    scorer = RewardScorer(model)
    pad, beta = tokenizer.pad_token_id, 0.1
    pairs = sort_pairs(tiny_model_dir, tokenizer, 6)
    assert len({len(p.rejected_ids) for p in pairs} | {len(p.chosen_ids) for p in pairs}) > 1, (
        "padding must matter"
    )
    losses, stats, _ = reward_loss_fn("linear", pad)(scorer, pairs)
    losses.mean().backward()
    ours = _flat_grad(model)
    model.zero_grad()

    def r(prompt, response):
        return model(input_ids=torch.tensor([prompt + response])).logits[0, 0]

    estimator = sum(
        r(p.prompt_ids, p.chosen_ids) - r(p.prompt_ids, p.rejected_ids) for p in pairs
    ) / (beta * len(pairs))
    estimator.backward()
    g_hat = _flat_grad(model)
    assert ours.abs().max() > 1e-4
    assert torch.allclose(ours, -beta * g_hat, atol=1e-6, rtol=1e-4)
    # The padded batch scores each sequence at its last real token, like the unpadded forward.
    with torch.no_grad():
        margins = [
            float(r(p.prompt_ids, p.chosen_ids) - r(p.prompt_ids, p.rejected_ids)) for p in pairs
        ]
    assert torch.allclose(stats["demo_margin"], torch.tensor(margins), atol=1e-5)
    with torch.no_grad():
        logistic, _, _ = reward_loss_fn("logistic", pad)(scorer, pairs)
    assert torch.allclose(
        logistic, -torch.nn.functional.logsigmoid(torch.tensor(margins)), atol=1e-5
    )


def test_preference_pairs_with_weight_zero_change_nothing_and_enter_the_loss_otherwise(
    tiny_model_dir, tokenizer, tmp_path
):
    pad = tokenizer.pad_token_id
    demo = sort_pairs(tiny_model_dir, tokenizer, 8)
    encoder = Encoder(tokenizer, "plain", 48, 24)
    from demoalign.data.tasks import get_task, task_pairs, task_prompts

    task = get_task("sort")
    raw = task_pairs(task, task_prompts(task, 8, seed=5), seed=5)

    def preference(weight):
        return [
            Pair(
                encoder.prompt_ids(pair.example),
                encoder.response_ids(pair.example.response),
                encoder.response_ids(pair.rejected),
                weight=weight,
                kind="preference",
            )
            for pair in raw
        ]

    config = rft_config(tiny_model_dir, tmp_path / "unused")
    runs = {}
    for name, prefs in (("none", []), ("w0", preference(0.0)), ("w2", preference(2.0))):
        trainer = reward_trainer(config, tokenizer, tmp_path)
        records = reward_step(trainer, demo, prefs, 3, reward_loss_fn("logistic", pad), (0,), {})
        runs[name] = (
            records,
            torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()]),
        )
    none, w0, w2 = runs["none"], runs["w0"], runs["w2"]
    assert torch.equal(none[1], w0[1]), (
        "weight 0 must leave the reward model exactly as without preference pairs"
    )
    assert [r["loss"] for r in none[0]] == [r["loss"] for r in w0[0]]
    assert "preference_accuracy" in w0[0][0] and "preference_accuracy" not in none[0][0]
    assert not torch.equal(none[1], w2[1])
    # First step (same weights): loss = mean demo loss + 2 × mean preference loss.
    # The preference pairs of the first step are the first seeded batch of the preference stream.
    from demoalign.trainer import cyclic_batches

    fresh = RewardScorer(load_reward_model(config, tokenizer))
    drawn = next(cyclic_batches(preference(1.0), 4, 0, 1))
    with torch.no_grad():
        drawn_losses, _, _ = reward_loss_fn("logistic", pad)(fresh, drawn)
    added = w2[0][0]["loss"] - none[0][0]["loss"]
    assert added > 0 and added == pytest.approx(2.0 * drawn_losses.mean().item(), rel=1e-4)


def test_rloo_policy_step_converges_to_the_kl_regularised_optimum(
    tiny_model_dir, tokenizer, tmp_path
):
    """One prompt, one-token responses: the whole response space is the vocabulary, so π(·|x) and
    the optimum π_ref(y|x) exp(r(y)/β) / Z are computed exactly; RLOO must get within TV 0.02 of it
    (from 0.21)."""
    prompt = tokenizer("sort: 3 1 2\n")["input_ids"]
    tokens = [tokenizer.convert_tokens_to_ids(t) for t in ("1", "2", "3", "4")]
    assert len(set(tokens)) == 4 and tokenizer.unk_token_id not in tokens
    # π_ref: the tiny model taught by SFT to answer with the four tokens at rates 0.4, 0.3, 0.2,
    # 0.1.
    config = rft_config(
        tiny_model_dir,
        tmp_path / "unused",
        learning_rate=1e-2,
        batch_size=10,
        rollouts=8,
        max_new_tokens=1,
        beta=1.0,
        generation_batch_size=80,
        lr_scheduler="constant",
        warmup_ratio=0.0,
    )
    trainer = Trainer(
        config,
        fresh_model(tiny_model_dir),
        make_accelerator(config),
        MetricsLog(tmp_path / "m", enabled=False),
    )
    demos = [Tokenized(prompt, [t]) for t, n in zip(tokens, (4, 3, 2, 1)) for _ in range(n)]
    for _ in range(60):
        trainer.step(demos, sft_loss_fn(tokenizer.pad_token_id), float(len(demos)))

    @torch.no_grad()
    def distribution(model):
        return torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)

    reference = fresh_model(tiny_model_dir)
    reference.load_state_dict(trainer.unwrapped.state_dict())
    reference.eval()
    p_ref = distribution(reference)
    assert p_ref[tokens].sum() > 0.9
    rewards = torch.zeros_like(p_ref)
    rewards[tokens] = torch.tensor([0.0, 1.0, 0.5, -0.5])
    target = p_ref * torch.exp(rewards / config.beta)
    target /= target.sum()

    def tv(p):
        return 0.5 * (p - target).abs().sum().item()

    start = tv(p_ref)
    assert start > 0.15
    # A new optimiser for the policy step, as in a run (the SFT above only built π_ref).
    trainer = Trainer(
        config,
        trainer.unwrapped,
        make_accelerator(config),
        MetricsLog(tmp_path / "m2", enabled=False),
    )
    trainer.start_schedule(150)
    from collections import deque

    rollouts = Rollouts(
        GenerationEngine(),
        reward_fn=lambda rows: [rewards[r.response_ids[0]].item() for r in rows],
        ref_logps_fn=lambda rows: sequence_logps_of(reference, rows, tokenizer.pad_token_id, 80),
    )
    with rollouts.engine:
        phase = PolicyPhase(150, seed_parts=(0,), context={}, window=deque(maxlen=10))
        records = policy_step(trainer, tokenizer, [prompt], rollouts, config, phase)
    final = tv(distribution(trainer.unwrapped))
    assert final < 0.02, (start, final)
    # The logged KL estimate approaches KL(π* ‖ π_ref) = E*[r]/β − log Z.
    kl_star = (target * (rewards / config.beta)).sum() - torch.log(
        (p_ref * torch.exp(rewards / config.beta)).sum()
    )
    assert records[-1]["kl_running_mean"] == pytest.approx(kl_star.item(), abs=0.05)
    assert records[-1]["reward_running_mean"] > records[0]["reward"]


def test_end_to_end_two_outer_iterations_write_every_output(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = train(
        rft_config(
            tiny_model_dir, tmp_path / "run", preference_data="task:sort:5", preference_weight=0.5
        )
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "rft" and config["outer_iterations"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [m["event"] for m in metrics if "event" in m]
    assert (
        events.count("iteration_start") == 2
        and events.count("reward_eval") == 2
        and "memory" in events
    )
    memory = next(m for m in metrics if m.get("event") == "memory")
    assert (
        memory["reference_param_bytes"] == memory["policy_param_bytes"] > 0
        and memory["reward_model_param_bytes"] > 0
    )
    policy = [m for m in metrics if m.get("phase") == "policy"]
    reward = [m for m in metrics if m.get("phase") == "reward"]
    assert len(policy) == 4 and len(reward) == 8
    for key in ("kl", "reward", "kl_running_mean", "reward_running_mean", "loss", "grad_norm"):
        assert all(key in m for m in policy), key
    for key in ("pair_accuracy", "pair_margin", "preference_accuracy"):
        assert all(key in m for m in reward), key
    assert policy[0]["kl"] == pytest.approx(0, abs=1e-5), (
        "the first policy step samples the reference itself"
    )
    # The reference stays the INITIAL policy: iteration 2 starts away from it.
    assert abs(policy[2]["kl"]) > 1e-6
    evals = [m for m in metrics if m.get("event") == "reward_eval"]
    assert all(
        e["after_heldout_pairs"] >= 1 and "after_preference_heldout_accuracy" in e for e in evals
    )
    assert metrics[-1]["event"] == "run_end" and metrics[-1]["reward_optimizer_steps"] == 8

    encoder = Encoder(tokenizer, "plain", 48, 24)
    from demoalign.data import Example

    for k in ("1", "2"):
        folder = out / "iterations" / k
        records = [
            json.loads(line) for line in (folder / "negatives.jsonl").read_text().splitlines()
        ]
        assert len(records) == 8 and sum(r["heldout"] for r in records) >= 1
        assert (folder / "policy" / "model.safetensors").exists()
        rm = AutoModelForSequenceClassification.from_pretrained(folder / "reward_model")
        # Scoring the saved reward model on the training rendering gives the logged reward.
        r = records[0]
        ids = encoder.prompt_ids(Example(r["prompt"], r["demonstration"])) + encoder.response_ids(
            r["demonstration"]
        )
        with torch.no_grad():
            score = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(r["reward_demonstration"], abs=1e-4)
    # final/ is the policy of the last iteration, saved as a plain model (no LoRA left).
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    last = AutoModelForCausalLM.from_pretrained(out / "iterations" / "2" / "policy")
    assert all(torch.equal(v, last.state_dict()[k]) for k, v in model.state_dict().items())
    start = fresh_model(tiny_model_dir).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items()), (
        "the policy never moved"
    )


def test_rft_config_is_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward_loss"):
        rft_config(tiny_model_dir, tmp_path, reward_loss="hinge")
    with pytest.raises(ValueError, match="rollouts"):
        rft_config(tiny_model_dir, tmp_path, rollouts=1)
    with pytest.raises(ValueError, match="did you mean `preference_weight`"):
        rft_config(tiny_model_dir, tmp_path, preference_data_weight=1.0)


def test_the_reward_and_policy_phases_show_progress_bars(tiny_model_dir, tmp_path, capsys):
    train(rft_config(tiny_model_dir, tmp_path / "run", show_progress=True, outer_iterations=1))
    shown = capsys.readouterr().out
    assert re.search(r"iteration 1: negatives .* 16/16", shown), shown
    assert re.search(r"iteration 1: reward model .* 4/4", shown), shown
    assert re.search(r"iteration 1: policy \(RLOO\) .* 2/2", shown), shown


def test_a_new_scalar_head_loads_without_transformers_missing_key_report(tiny_model_dir, tokenizer):
    import logging

    from transformers.utils import logging as hf_logging

    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    before = hf_logging.get_verbosity()
    try:
        load_reward_model_from(str(tiny_model_dir), same_ids_as=tokenizer, seed=0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in shown if "MISSING" in m]  # the new head is expected: no alarm
    assert hf_logging.get_verbosity() == before


def test_preference_data_that_is_not_pairs_fails_before_the_run_folder_exists(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="preference pairs need prompt/chosen/rejected"):
        train(rft_config(tiny_model_dir, out, preference_data=str(DOLLY)))
    assert not out.exists()  # nothing to clean up, and the fixed command needs no overwrite=true


def test_lora_policy_uses_the_base_as_reference_without_a_copy(tiny_model_dir, tmp_path):
    """With LoRA the KL reference is the base with adapters disabled: no reference copy, the first
    policy step is at KL 0, the adapters train, and final/ is a merged plain model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = train(rft_config(tiny_model_dir, tmp_path / "lora", lora_r=4, learning_rate=1e-2))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = next(m for m in metrics if m.get("event") == "memory")
    assert memory["reference_param_bytes"] == 0 and "adapters disabled" in memory["note"]
    policy = [m for m in metrics if m.get("phase") == "policy"]
    assert policy[0]["kl"] == pytest.approx(0, abs=1e-5)
    assert abs(policy[-1]["kl"]) > 1e-6, "the adapters must move the policy away from the base"
    assert (out / "iterations" / "1" / "policy" / "adapter_config.json").exists()
    final = load_file(str(out / "final" / "model.safetensors"))
    assert not any("lora" in key for key in final), "final/ must be merged"
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in final if k in start), (
        "merged weights must differ"
    )
    AutoModelForCausalLM.from_pretrained(out / "final")
