"""RFT (SPEC.md §3): an explicit reward model learnt from demonstrations, and RL of the policy
against it.

    π_0 := initial policy = the KL reference π_ref; r_0 := reward model
    for t in 0..T−1:
        next chunk of demonstrations (x, y); sample ỹ ~ π_t(·|x)          (methods.make_negatives)
        reward step: `reward_steps` optimiser steps raising r(x, y) − r(x, ỹ)
                     (logistic −log σ(Δ) or linear −Δ; optional preference pairs, weight w)
        policy step: `policy_steps` RLOO steps against r_{t+1}, each on fresh rollouts:
                     k samples per prompt, shaped reward R = r(x, y) − β (log π(y|x) − log π_ref(y|x))
                     per sequence, advantage R_i − mean_{j≠i} R_j, loss −A_i log π(y_i|x)

RLOO with the KL in the reward is REINFORCE on E_π[r − β log(π/π_ref)], whose maximiser is
π_ref · exp(r/β) / Z (tests/test_rft.py checks convergence to it on an enumerable problem).
Every optimiser step of both models is `Trainer.step` (the one training loop); the reward model
runs inside it through `RewardScorer`, the policy through the usual `SequenceScorer`.

Both models read the SAME token ids: prompt rendered by the run's template, then the response
and its EOS (batching.Encoder); the reward is the scalar head at the last real token.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .batching import Encoder, Tokenized, collate
from .generation import generate_ids
from .logprobs import model_sequence_logps
from .runio import atomic_write_jsonl, save_pretrained_atomic
from .trainer import Trainer, seeded_permutation

# ---------------------------------------------------------------- reward model


class RewardScorer(torch.nn.Module):
    """Wraps an AutoModelForSequenceClassification (num_labels=1): forward gives one scalar per
    row, the head applied to the trunk's hidden state at the LAST REAL token (right padding; the
    attention mask, not the pad id, finds it, so a pad id equal to EOS is harmless). The model is
    kept as `.lm`, the name Trainer.unwrapped reads."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model
        if not isinstance(getattr(model, "score", None), torch.nn.Linear):
            raise ValueError(f"{type(model).__name__} has no `score` head; the reward model must be an "
                             "AutoModelForSequenceClassification with num_labels=1")

    def forward(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        trunk = getattr(self.lm, self.lm.base_model_prefix)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(-1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.lm.score(pooled).squeeze(-1).float()


def load_reward_model(config, tokenizer):
    """From `reward_model`, or from the policy's weights (`model`) with a fresh scalar head."""
    from transformers import AutoModelForSequenceClassification

    path = config.reward_model or config.model
    if config.reward_model:
        from transformers import AutoTokenizer

        try:
            other = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            other = None
        if other is not None and other.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"reward_model={path} has a different tokenizer from the policy; both must read the same ids")
    torch.manual_seed(config.seed)  # the new head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@dataclass
class RewardPair:
    """A (better, worse) pair for the reward step: a demonstration and the policy's negative, or a
    real preference pair (kind "preference", weighted by `preference_weight`)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    kind: str = "demo"


def _scores(model, pairs: list[RewardPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    rows = [Tokenized(p.prompt_ids, p.chosen_ids) for p in pairs] + [Tokenized(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = collate(rows, pad_id)
    scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return scores[: len(pairs)], scores[len(pairs):]


def reward_loss_fn(loss_type: str, pad_id: int):
    """Per pair: logistic −log σ(r(y) − r(ỹ)), or linear −(r(y) − r(ỹ)), times the pair's weight.
    Statistics are split by kind (demonstration pairs vs preference pairs)."""

    def loss_fn(model, pairs: list[RewardPair]):
        chosen, rejected = _scores(model, pairs, pad_id)
        margin = chosen - rejected
        per_pair = -torch.nn.functional.logsigmoid(margin) if loss_type == "logistic" else -margin
        weights = torch.tensor([p.weight for p in pairs], device=margin.device)
        is_demo = torch.tensor([p.kind == "demo" for p in pairs], device=margin.device, dtype=torch.float32)
        m = margin.detach()
        correct = (m > 0).float() + 0.5 * (m == 0).float()
        stats = {
            "demo_n": is_demo, "demo_correct": correct * is_demo, "demo_margin": m * is_demo,
            "demo_reward": chosen.detach() * is_demo, "negative_reward": rejected.detach() * is_demo,
            "pref_n": 1 - is_demo, "pref_correct": correct * (1 - is_demo), "pref_margin": m * (1 - is_demo),
        }
        return per_pair * weights, stats, torch.tensor(float(sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)))

    return loss_fn


def _finish_reward_record(record: dict) -> dict:
    """Turn the per-kind sums of `reward_loss_fn` into means over their own kind."""
    out = {k: v for k, v in record.items() if not k.startswith(("demo_", "pref_", "negative_reward"))}
    for kind, keys in (("demo", ("correct", "margin", "reward")), ("pref", ("correct", "margin"))):
        n = record.get(f"{kind}_n", 0)
        if n > 0:
            for key in keys:
                name = {"correct": "accuracy"}.get(key, key)
                out[f"{'pair' if kind == 'demo' else 'preference'}_{name}"] = record[f"{kind}_{key}"] / n
    if record.get("demo_n", 0) > 0:
        out["pair_reward_demo"] = out.pop("pair_reward")
        out["pair_reward_negative"] = record["negative_reward"] / record["demo_n"]
    return out


@torch.no_grad()
def evaluate_reward_pairs(scorer, pairs: list[RewardPair], pad_id: int, batch_size: int) -> dict:
    """Accuracy (ties ½) and mean margin r(chosen) − r(rejected) of a reward model on pairs."""
    if not pairs:
        return {}
    was_training = scorer.training
    scorer.eval()
    margins = []
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = _scores(scorer, pairs[start : start + batch_size], pad_id)
        margins += (chosen - rejected).tolist()
    scorer.train(was_training)
    return {"accuracy": sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins),
            "margin": sum(margins) / len(margins), "pairs": len(margins)}


@torch.no_grad()
def _in_eval_batches(model, rows: list[Tokenized], pad_id: int, batch_size: int, score) -> list[float]:
    """`score(model, batch)` over padded batches of `rows`, in eval mode, one float per row."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
        out += score(model, batch).tolist()
    model.train(was_training)
    return out


def score_rows(scorer, rows: list[Tokenized], pad_id: int, batch_size: int) -> list[float]:
    return _in_eval_batches(scorer, rows, pad_id, batch_size,
                            lambda m, b: m(b["input_ids"], b["attention_mask"]))


def cyclic_batches(items: list, size: int, *seed_parts: int):
    """Endless batches of `size` items: seeded shuffled passes, one after another."""
    epoch = 0
    buffer: list = []
    while True:
        while len(buffer) < size:
            buffer += [items[i] for i in seeded_permutation(len(items), *seed_parts, epoch)]
            epoch += 1
        batch, buffer = buffer[:size], buffer[size:]
        yield batch


def reward_step(trainer: Trainer, pairs: list[RewardPair], preference: list[RewardPair], steps: int, loss_fn,
                seed_parts: tuple[int, ...], context: dict) -> list[dict]:
    """`steps` optimiser steps of the reward model, each on `global_batch` demonstration pairs plus
    as many preference pairs (when given). The loss is normalised by the demonstration pairs, so
    it is mean demo loss + w × mean preference loss; with w = 0 the preference pairs add exactly 0."""
    demo_batches = cyclic_batches(pairs, trainer.global_batch, *seed_parts, 0)
    pref_batches = cyclic_batches(preference, trainer.global_batch, *seed_parts, 1) if preference else None
    records = []
    for _ in range(steps):
        demo = next(demo_batches)
        batch = demo + (next(pref_batches) if pref_batches else [])
        record = _finish_reward_record(trainer.step(batch, loss_fn, float(len(demo))))
        record.update(context)
        trainer.log.write(record)
        records.append(record)
    return records


# ---------------------------------------------------------------- policy step (RLOO)


@dataclass
class RolloutGroup:
    """k sampled responses to one prompt, with their rewards and reference log-probs (fixed
    numbers, computed when sampled)."""

    prompt_ids: list[int]
    samples: list[list[int]]
    rewards: list[float]
    ref_logps: list[float]


def rloo_loss_fn(beta: float, pad_id: int):
    """RLOO with the KL in the reward. Per group of k samples: R_i = r_i − β (log π(y_i) − log π_ref(y_i)),
    A_i = R_i − mean_{j≠i} R_j, loss = −(1/k) Σ_i A_i log π(y_i). On-policy (the samples come from
    the weights being updated), its expected gradient is ∇ of E_π[r] − β KL(π ‖ π_ref)."""

    def loss_fn(model, groups: list[RolloutGroup]):
        k = len(groups[0].samples)
        rows = [Tokenized(g.prompt_ids, s) for g in groups for s in g.samples]
        device = next(model.parameters()).device
        batch = {key: v.to(device) for key, v in collate(rows, pad_id).items()}
        logps, n_tokens = model_sequence_logps(model, batch)
        logp = logps.view(len(groups), k)
        rewards = torch.tensor([g.rewards for g in groups], device=device, dtype=logp.dtype)
        ref = torch.tensor([g.ref_logps for g in groups], device=device, dtype=logp.dtype)
        kl = logp.detach() - ref
        shaped = rewards - beta * kl
        baseline = (shaped.sum(1, keepdim=True) - shaped) / (k - 1)
        advantage = shaped - baseline
        losses = -(advantage * logp).sum(1) / k
        stats = {"reward": rewards.mean(1), "kl": kl.mean(1), "shaped_reward": shaped.mean(1),
                 "response_tokens": n_tokens.view(len(groups), k).float().mean(1)}
        return losses, stats, n_tokens.sum()

    return loss_fn


def sequence_logps_of(model, rows: list[Tokenized], pad_id: int, batch_size: int) -> list[float]:
    return _in_eval_batches(model, rows, pad_id, batch_size, lambda m, b: model_sequence_logps(m, b)[0])


def make_rollouts(policy, tokenizer, prompts: list[list[int]], k: int, reward_fn, ref_logps_fn, *, max_length: int,
                  max_new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int) -> list[RolloutGroup]:
    """k samples per prompt from `policy`; `reward_fn(rows)` and `ref_logps_fn(rows)` give one float per
    Tokenized row (prompt ids + response ids, the response's EOS included when it was generated)."""
    repeated = [p for p in prompts for _ in range(k)]
    room = max_length - max(len(p) for p in prompts)
    generated = generate_ids(policy, tokenizer, repeated, max_new_tokens=max(1, min(max_new_tokens, room)),
                             temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, show_progress=False)
    rows = [Tokenized(repeated[i], generated[i] or [tokenizer.eos_token_id]) for i in range(len(repeated))]
    rewards, refs = reward_fn(rows), ref_logps_fn(rows)
    return [RolloutGroup(prompts[g], [rows[g * k + j].response_ids for j in range(k)],
                         rewards[g * k : (g + 1) * k], refs[g * k : (g + 1) * k]) for g in range(len(prompts))]


def policy_step(trainer: Trainer, tokenizer, prompts: list[list[int]], steps: int, reward_fn, ref_logps_fn, config,
                seed_parts: tuple[int, ...], context: dict, window: deque) -> list[dict]:
    """`steps` RLOO steps; each samples `rollouts` responses for each of `global_batch` prompts
    with the current weights, then takes one optimiser step on them (strictly on-policy)."""
    loss_fn = rloo_loss_fn(config.beta, tokenizer.pad_token_id)
    batches = cyclic_batches(prompts, trainer.global_batch, *seed_parts)
    records = []
    for _ in range(steps):
        started = time.perf_counter()
        groups = make_rollouts(
            trainer.unwrapped, tokenizer, next(batches), config.rollouts, reward_fn, ref_logps_fn,
            max_length=config.max_length, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, batch_size=config.generation_batch_size,
            seed=config.seed * 7919 + 1_000_000 + trainer.global_step,
        )
        rollout_s = time.perf_counter() - started
        record = trainer.step(groups, loss_fn, float(len(groups)))
        window.append((record["kl"], record["reward"]))
        record.update(context, rollout_s=rollout_s,
                      kl_running_mean=sum(w[0] for w in window) / len(window),
                      reward_running_mean=sum(w[1] for w in window) / len(window))
        trainer.log.write(record)
        records.append(record)
    return records


# ---------------------------------------------------------------- data


def load_preference_pairs(spec: str, seed: int = 0) -> list[tuple]:
    """(Example(prompt, chosen, history), rejected) from `task:NAME[:SEED]` (1000 correct vs
    plausible-wrong pairs), or a preference file read by `data.load_preference_pairs`."""
    from .data import Example
    from .data import load_preference_pairs as load_pairs_file

    if spec.startswith("task:"):
        from .tasks import get_task, task_pairs, task_prompts

        name, _, data_seed = spec[len("task:"):].partition(":")
        task = get_task(name)
        data_seed = int(data_seed or 0)
        return [(Example(p, good), bad) for p, good, bad in task_pairs(task, task_prompts(task, 1000, data_seed), data_seed)]
    return load_pairs_file(spec)


def iteration_chunks(n: int, iterations: int, per_iteration: int, seed: int) -> list[list[int]]:
    """Shuffle with the seed; iteration t takes the next `per_iteration` indices (the data split
    evenly over T when 0), wrapping around if T × per_iteration exceeds the data."""
    per = per_iteration or n // iterations
    if per < 1:
        raise ValueError(f"{n} examples cannot fill {iterations} outer iterations; lower `outer_iterations`")
    order = seeded_permutation(n, seed, 0)
    return [[order[(t * per + i) % n] for i in range(per)] for t in range(iterations)]


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


# ---------------------------------------------------------------- the run


def add_lora(model, config):
    """The policy with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def run_rft(config, trainer: Trainer, encoder: Encoder, examples: list, out_dir: Path, tokenizer) -> dict:
    """All outer iterations; `trainer` holds the policy. Returns counts for the run_end record."""
    from .methods import make_negatives, negative_records

    acc = trainer.accelerator
    if acc.num_processes > 1:
        raise ValueError("RFT runs in one process for now (rollouts are not yet sharded across processes)")
    log = trainer.log
    pad = tokenizer.pad_token_id
    T = config.outer_iterations
    chunks = iteration_chunks(len(examples), T, config.prompts_per_iteration, config.seed)

    # Reference π_ref = the initial policy: with LoRA the base with adapters disabled (no copy);
    # otherwise a frozen copy in inference mode.
    policy = trainer.unwrapped
    lora = hasattr(policy, "disable_adapter")
    reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
    # Reward model, trained by its own Trainer (same loop, its own optimiser and learning rate).
    reward_config = replace(config, learning_rate=config.reward_learning_rate)
    reward_trainer = Trainer(reward_config, load_reward_model(config, tokenizer), acc, log, wrapper=RewardScorer)
    scorer = acc.unwrap_model(reward_trainer.model)
    note = ("LoRA: the reference is the base model with the adapters disabled; no copy is held" if lora else
            "full fine-tuning: the reference is a frozen copy of the initial policy held in inference mode "
            "(no gradients, no optimiser state)")
    ref_bytes = 0 if reference is None else _param_bytes(reference)
    log.write({
        "event": "memory", "policy_param_bytes": _param_bytes(policy), "reference_param_bytes": ref_bytes,
        "reward_model_param_bytes": _param_bytes(scorer.lm), "note": note,
    })
    if acc.is_main_process and config.show_progress:
        print(f"RFT: {note}; policy {_param_bytes(policy) / 2**20:.1f} MiB, reference {ref_bytes / 2**20:.1f} MiB, "
              f"reward model {_param_bytes(scorer.lm) / 2**20:.1f} MiB of parameters")

    preference_train, preference_eval = [], []
    if config.preference_data:
        raw = load_preference_pairs(config.preference_data)
        order = seeded_permutation(len(raw), config.seed, 1)
        n_eval = max(1, round(config.heldout_fraction * len(raw))) if config.heldout_fraction > 0 else 0
        for rank, i in enumerate(order):
            example, rejected = raw[i]
            prompt = encoder.prompt_ids(example)
            chosen = encoder.fit(prompt, encoder.response_ids(example.response)).response_ids
            worse = encoder.fit(prompt, encoder.response_ids(rejected)).response_ids
            pair = RewardPair(prompt, chosen, worse, config.preference_weight, "preference")
            (preference_eval if rank < n_eval else preference_train).append(pair)

    reward_trainer.start_schedule(T * config.reward_steps)
    trainer.start_schedule(T * config.policy_steps)
    reward_loss = reward_loss_fn(config.reward_loss, pad)
    window: deque = deque(maxlen=10)
    batch = config.generation_batch_size

    def reward_fn(rows):
        return score_rows(scorer, rows, pad, batch)

    def ref_logps_fn(rows):
        if reference is None:
            with policy.disable_adapter():
                return sequence_logps_of(policy, rows, pad, batch)
        return sequence_logps_of(reference, rows, pad, batch)

    totals = {"pairs": 0, "negatives_truncated": 0, "demonstrations_truncated": 0}
    # Held-out demonstrations are chosen once for the run, by example: chunks may wrap around the
    # data, and a demonstration trained on in one iteration must never be held out in another.
    n_heldout = round(config.heldout_fraction * len(examples)) if config.heldout_fraction > 0 else 0
    heldout_examples = set(seeded_permutation(len(examples), config.seed, 2)[:n_heldout])
    trained_examples: set[int] = set()
    for k, chunk_idx in enumerate(chunks, start=1):
        chunk = [examples[i] for i in chunk_idx]
        folder = out_dir / "iterations" / str(k)
        started = time.perf_counter()
        pairs = make_negatives(config, trainer, encoder, chunk, k)  # sampled by π_{k−1}; ref_* = its log-probs
        gen_s = time.perf_counter() - started
        totals["pairs"] += len(pairs)
        totals["negatives_truncated"] += sum(p.negative_truncated for p in pairs)
        totals["demonstrations_truncated"] += sum(p.demo_truncated for p in pairs)
        reward_pairs = [RewardPair(p.prompt_ids, p.demo_ids, p.negative_ids) for p in pairs]
        example_ids = [chunk_idx[p.index] for p in pairs]
        if n_heldout and not heldout_examples.intersection(example_ids):
            # Every iteration evaluates on some held-out pair: hold out one never-trained example.
            fresh = [e for e in example_ids if e not in trained_examples]
            if fresh:
                heldout_examples.add(fresh[-1])
        is_held = [e in heldout_examples for e in example_ids]
        trained_examples.update(e for e, h in zip(example_ids, is_held) if not h)
        held = [rp for rp, h in zip(reward_pairs, is_held) if h]
        train_pairs = [rp for rp, h in zip(reward_pairs, is_held) if not h]
        if not train_pairs:
            raise ValueError(f"iteration {k}: every demonstration is held out; lower heldout_fraction")

        def evaluation(when: str) -> dict:
            record = {}
            for name, subset in (("train", train_pairs), ("heldout", held), ("preference_heldout", preference_eval)):
                for key, value in evaluate_reward_pairs(scorer, subset, pad, batch).items():
                    record[f"{when}_{name}_{key}"] = value
            return record

        before = evaluation("before")
        log.write({"event": "iteration_start", "iteration": k, "pairs": len(pairs), "heldout_pairs": len(held),
                   "generation_s": gen_s,
                   "negative_tokens_mean": sum(len(p.negative_ids) for p in pairs) / len(pairs),
                   "negatives_equal_demo": sum(p.negative_ids == p.demo_ids for p in pairs) / len(pairs)})
        reward_step(reward_trainer, train_pairs, preference_train, config.reward_steps, reward_loss,
                    (config.seed, k), {"method": "rft", "phase": "reward", "iteration": k})
        log.write({"event": "reward_eval", "iteration": k, **before, **evaluation("after")})

        # Negatives with the reward scores of the model this iteration trained (r_k).
        records = negative_records(pairs, chunk, tokenizer)
        r_demo = reward_fn([Tokenized(p.prompt_ids, p.demo_ids) for p in pairs])
        r_neg = reward_fn([Tokenized(p.prompt_ids, p.negative_ids) for p in pairs])
        held_ids = {id(p) for p in held}
        for rec, pair, rd, rn in zip(records, reward_pairs, r_demo, r_neg):
            rec["policy_logp_demonstration"] = rec.pop("ref_logp_demonstration")
            rec["policy_logp_negative"] = rec.pop("ref_logp_negative")
            rec.update(reward_demonstration=rd, reward_negative=rn, heldout=id(pair) in held_ids)
        if acc.is_main_process:
            atomic_write_jsonl(folder / "negatives.jsonl", records)
            save_pretrained_atomic(scorer.lm, tokenizer, folder / "reward_model")

        prompts = [p.prompt_ids for p in pairs]
        policy_step(trainer, tokenizer, prompts, config.policy_steps, reward_fn, ref_logps_fn, config,
                    (config.seed, 3, k), {"method": "rft", "phase": "policy", "iteration": k}, window)
        if acc.is_main_process:
            save_pretrained_atomic(trainer.unwrapped, tokenizer, folder / "policy")
    totals["reward_optimizer_steps"] = reward_trainer.global_step
    return totals
