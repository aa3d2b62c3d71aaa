"""RFT's policy step: RLOO with the KL in the reward (the advantages are
`losses.rloo_advantages`), on rollouts sampled from the weights being updated."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from ..encoding import Tokenized, collate
from ..generation import GenerationEngine, SamplingOptions, Share, check_one_each, generate_ids
from ..logprobs import model_sequence_logps
from ..losses import rloo_advantages
from ..pairs import in_eval_batches
from ..trainer import Trainer, cyclic_batches


@dataclass
class RolloutGroup:
    """k sampled responses to one prompt, with their rewards and reference log-probs (fixed
    numbers, computed when sampled)."""

    prompt_ids: list[int]
    samples: list[list[int]]
    rewards: list[float]
    ref_logps: list[float]


def rloo_loss_fn(beta: float, pad_id: int):
    """RLOO with the KL in the reward. Per group of k samples: R_i = r_i − β (log π(y_i) − log
    π_ref(y_i)),
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
        advantage = rloo_advantages(shaped)
        losses = -(advantage * logp).sum(1) / k
        stats = {
            "reward": rewards.mean(1),
            "kl": kl.mean(1),
            "shaped_reward": shaped.mean(1),
            "response_tokens": n_tokens.view(len(groups), k).float().mean(1),
        }
        return losses, stats, n_tokens.sum()

    return loss_fn


def sequence_logps_of(
    model, rows: list[Tokenized], pad_id: int, batch_size: int, padding_free: bool = False
) -> list[float]:
    """Summed response log-probs of `rows`; `padding_free` as the policy's training forward."""
    return in_eval_batches(
        model, rows, pad_id, batch_size, lambda m, b: model_sequence_logps(m, b, padding_free)[0]
    )


@dataclass
class Rollouts:
    """How rollouts are sampled and scored: through `engine` (the run's GenerationEngine);
    `reward_fn(rows)` and `ref_logps_fn(rows)` give one float per Tokenized row (prompt ids +
    response ids, the response's EOS included when it was generated)."""

    engine: GenerationEngine
    reward_fn: Callable[[list[Tokenized]], list[float]]
    ref_logps_fn: Callable[[list[Tokenized]], list[float]]


def rollout_options(config, prompts: list[list[int]], seed: int) -> SamplingOptions:
    """The run's sampling settings, with as many new tokens as the longest prompt leaves room for
    within max_length."""
    room = config.max_length - max(len(p) for p in prompts)
    return SamplingOptions(
        max_new_tokens=max(1, min(config.max_new_tokens, room)),
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.generation_batch_size,
        backend=config.generation_backend,
        seed=seed,
    )


def make_rollouts(
    rollouts: Rollouts,
    policy,
    tokenizer,
    prompts: list[list[int]],
    k: int,
    options: SamplingOptions,
    share: Share = Share(show_progress=False),
) -> list[RolloutGroup]:
    """k samples per prompt from `policy`, scored by `rollouts`. With several processes (`share`)
    each samples its share of the generation batches (the samples do not depend on the number of
    processes) and every process gets every group."""
    repeated = [p for p in prompts for _ in range(k)]
    generated = generate_ids(rollouts.engine, policy, tokenizer, repeated, options, share)
    indices = sorted(generated)
    rows = [Tokenized(repeated[i], generated[i] or [tokenizer.eos_token_id]) for i in indices]
    # Each process scores what it sampled, then all is gathered: Trainer.step takes the global
    # batch on every process and splits it itself. Scoring only the groups of one's own
    # micro-batches would tie this to that split, and would still need the others' samples.
    rewards, refs = rollouts.reward_fn(rows), rollouts.ref_logps_fn(rows)
    scored = list(zip(indices, [r.response_ids for r in rows], rewards, refs))
    if share.num_processes > 1:
        scored = sorted(gather_object(scored), key=lambda s: s[0])
        check_one_each([s[0] for s in scored], len(repeated), "rollouts")
    _, samples, rewards, refs = (list(column) for column in zip(*scored))
    return [
        RolloutGroup(
            prompts[g],
            samples[g * k : (g + 1) * k],
            rewards[g * k : (g + 1) * k],
            refs[g * k : (g + 1) * k],
        )
        for g in range(len(prompts))
    ]


@dataclass
class PolicyPhase:
    """One policy phase of RFT: its optimiser steps, the seeds of its prompt order, what its
    records carry, and the window of the KL and reward running means (kept across phases)."""

    steps: int
    seed_parts: tuple[int, ...]
    context: dict
    window: deque = field(default_factory=lambda: deque(maxlen=10))


def policy_step(
    trainer: Trainer,
    tokenizer,
    prompts: list[list[int]],
    rollouts: Rollouts,
    config,
    phase: PolicyPhase,
) -> list[dict]:
    """`phase.steps` RLOO steps; each samples `config.rollouts` responses for each of `global_batch`
    prompts with the current weights (sampled and scored as `rollouts` says), then takes one
    optimiser step on them (strictly on-policy)."""
    loss_fn = rloo_loss_fn(config.beta, tokenizer.pad_token_id)
    acc = trainer.accelerator
    batches = cyclic_batches(prompts, trainer.global_batch, *phase.seed_parts)
    window, records = phase.window, []
    for _ in range(phase.steps):
        started = time.perf_counter()
        with acc.autocast():  # sampled as negatives are: the run's precision
            batch = next(batches)
            seed = config.seed * 7919 + 1_000_000 + trainer.global_step
            options = rollout_options(config, batch, seed)
            share = Share(acc.process_index, acc.num_processes, show_progress=False)
            policy = trainer.unwrapped
            groups = make_rollouts(
                rollouts, policy, tokenizer, batch, config.rollouts, options, share
            )
        rollout_s = time.perf_counter() - started
        record = trainer.step(groups, loss_fn, float(len(groups)))
        window.append((record["kl"], record["reward"]))
        record.update(
            phase.context,
            rollout_s=rollout_s,
            kl_running_mean=sum(w[0] for w in window) / len(window),
            reward_running_mean=sum(w[1] for w in window) / len(window),
        )
        trainer.log.write(record)
        records.append(record)
    return records
