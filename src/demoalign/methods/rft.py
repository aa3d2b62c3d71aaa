"""RFT (docs/algorithms.md): an explicit reward model learnt from demonstrations, and RL of the
policy against it.

    π_0 := initial policy = the KL reference π_ref; r_0 := reward model
    for t in 0..T−1:
        next chunk of demonstrations (x, y); sample ỹ ~ π_t(·|x)          (irft.make_negatives)
        reward step: `reward_steps` optimiser steps raising r(x, y) − r(x, ỹ)   (reward_model.py)
        policy step: `policy_steps` RLOO steps against r_{t+1}, each on fresh rollouts  (rloo.py)

RLOO with the KL in the reward is REINFORCE on E_π[r − β log(π/π_ref)], whose maximiser is
π_ref · exp(r/β) / Z. Every optimiser step of both models is `Trainer.step` (the one training
loop). Both models read the SAME token ids (the run's Encoder); the reward is the scalar head
at the last real token.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.sources import TRAIN_SEED, preference_pairs
from ..encoding import Encoder, Tokenized
from ..models import load_reward_model
from ..runio import atomic_write_jsonl, save_pretrained_atomic
from ..trainer import Trainer, seeded_permutation
from .irft import make_negatives, negative_records
from .reward_model import (RewardPair, RewardScorer, encode_preference_pairs,
                           evaluate_reward_pairs, reward_loss_fn, reward_step, score_rows)
from .rloo import policy_step, sequence_logps_of


def iteration_chunks(n: int, iterations: int, per_iteration: int, seed: int) -> list[list[int]]:
    """Shuffle with the seed; iteration t takes the next `per_iteration` indices (the data split
    evenly over T when 0), wrapping around if T × per_iteration exceeds the data."""
    per = per_iteration or n // iterations
    if per < 1:
        raise ValueError(f"{n} examples cannot fill {iterations} outer iterations; "
                         "lower `outer_iterations`")
    order = seeded_permutation(n, seed, 0)
    return [[order[(t * per + i) % n] for i in range(per)] for t in range(iterations)]


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


@dataclass
class _Run:
    """What every outer iteration shares."""

    config: object
    trainer: Trainer
    reward_trainer: Trainer
    encoder: Encoder
    out_dir: Path
    reference: object  # None with LoRA: the base with adapters disabled is the reference
    preference_train: list
    preference_eval: list
    heldout: set
    trained: set = field(default_factory=set)
    window: deque = field(default_factory=lambda: deque(maxlen=10))

    @property
    def scorer(self):
        return self.trainer.accelerator.unwrap_model(self.reward_trainer.model)

    def rewards(self, rows: list[Tokenized]) -> list[float]:
        pad = self.encoder.tokenizer.pad_token_id
        return score_rows(self.scorer, rows, pad, self.config.generation_batch_size)

    def reference_logps(self, rows: list[Tokenized]) -> list[float]:
        pad, batch = self.encoder.tokenizer.pad_token_id, self.config.generation_batch_size
        if self.reference is None:
            policy = self.trainer.unwrapped
            with policy.disable_adapter():
                return sequence_logps_of(policy, rows, pad, batch)
        return sequence_logps_of(self.reference, rows, pad, batch)


def _log_memory(run: _Run) -> None:
    policy, lm = run.trainer.unwrapped, run.scorer.lm
    ref_bytes = _param_bytes(run.reference)
    note = ("LoRA: the reference is the base model with the adapters disabled; no copy is held"
            if run.reference is None else
            "full fine-tuning: the reference is a frozen copy of the initial policy held in "
            "inference mode (no gradients, no optimiser state)")
    run.trainer.log.write({"event": "memory", "policy_param_bytes": _param_bytes(policy),
                           "reference_param_bytes": ref_bytes,
                           "reward_model_param_bytes": _param_bytes(lm), "note": note})
    if run.trainer.accelerator.is_main_process and run.config.show_progress:
        print(f"RFT: {note}; policy {_param_bytes(policy) / 2**20:.1f} MiB, reference "
              f"{ref_bytes / 2**20:.1f} MiB, reward model {_param_bytes(lm) / 2**20:.1f} MiB "
              "of parameters")


def _set_up(config, trainer: Trainer, encoder: Encoder, out_dir: Path, n_examples: int) -> _Run:
    policy = trainer.unwrapped
    lora = hasattr(policy, "disable_adapter")
    reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = load_reward_model(config.reward_model or config.model,
                                     same_ids_as=encoder.tokenizer, seed=config.seed)[0]
    reward_config = replace(config, learning_rate=config.reward_learning_rate)
    reward_trainer = Trainer(reward_config, reward_model, trainer.accelerator, trainer.log,
                             wrapper=RewardScorer)
    pref_train, pref_eval = [], []
    if config.preference_data:
        raw = preference_pairs(config.preference_data, None, TRAIN_SEED, task_count=1000)
        pref_train, pref_eval = encode_preference_pairs(raw, encoder, config)
    run = _Run(config, trainer, reward_trainer, encoder, out_dir, reference, pref_train,
               pref_eval, heldout=set())
    _log_memory(run)
    reward_trainer.start_schedule(config.outer_iterations * config.reward_steps)
    trainer.start_schedule(config.outer_iterations * config.policy_steps)
    # Held-out demonstrations are chosen once for the run, by example: chunks may wrap around
    # the data, and a demonstration trained on in one iteration is never held out in another.
    n_held = round(config.heldout_fraction * n_examples) if config.heldout_fraction > 0 else 0
    run.heldout.update(seeded_permutation(n_examples, config.seed, 2)[:n_held])
    return run


def _split_heldout(run: _Run, k: int, reward_pairs: list, example_ids: list[int]):
    """(train pairs, held-out pairs); every iteration evaluates on some held-out pair."""
    if run.heldout and not run.heldout.intersection(example_ids):
        fresh = [e for e in example_ids if e not in run.trained]
        if fresh:
            run.heldout.add(fresh[-1])
    is_held = [e in run.heldout for e in example_ids]
    run.trained.update(e for e, h in zip(example_ids, is_held) if not h)
    held = [rp for rp, h in zip(reward_pairs, is_held) if h]
    train = [rp for rp, h in zip(reward_pairs, is_held) if not h]
    if not train:
        raise ValueError(f"iteration {k}: every demonstration is held out; lower heldout_fraction")
    return train, held


def _reward_evaluation(run: _Run, when: str, subsets: dict) -> dict:
    pad, batch = run.encoder.tokenizer.pad_token_id, run.config.generation_batch_size
    return {f"{when}_{name}_{key}": value for name, subset in subsets.items()
            for key, value in evaluate_reward_pairs(run.scorer, subset, pad, batch).items()}


def _save_iteration(run: _Run, k: int, pairs, chunk, reward_pairs, held) -> None:
    """Negatives with the scores of the reward model this iteration trained (r_k)."""
    tokenizer = run.encoder.tokenizer
    records = negative_records(pairs, chunk, tokenizer)
    r_demo = run.rewards([Tokenized(p.prompt_ids, p.demo_ids) for p in pairs])
    r_neg = run.rewards([Tokenized(p.prompt_ids, p.negative_ids) for p in pairs])
    held_ids = {id(p) for p in held}
    for rec, pair, rd, rn in zip(records, reward_pairs, r_demo, r_neg):
        rec["policy_logp_demonstration"] = rec.pop("ref_logp_demonstration")
        rec["policy_logp_negative"] = rec.pop("ref_logp_negative")
        rec.update(reward_demonstration=rd, reward_negative=rn, heldout=id(pair) in held_ids)
    if run.trainer.accelerator.is_main_process:
        folder = run.out_dir / "iterations" / str(k)
        atomic_write_jsonl(folder / "negatives.jsonl", records)
        save_pretrained_atomic(run.scorer.lm, tokenizer, folder / "reward_model")


def _iteration(run: _Run, k: int, chunk_idx: list[int], examples: list, totals: dict) -> None:
    config, log = run.config, run.trainer.log
    chunk = [examples[i] for i in chunk_idx]
    started = time.perf_counter()
    pairs = make_negatives(config, run.trainer, run.encoder, chunk, k)  # by π_{k−1}
    gen_s = time.perf_counter() - started
    totals["pairs"] += len(pairs)
    totals["negatives_truncated"] += sum(p.negative_truncated for p in pairs)
    totals["demonstrations_truncated"] += sum(p.demo_truncated for p in pairs)
    reward_pairs = [RewardPair(p.prompt_ids, p.demo_ids, p.negative_ids) for p in pairs]
    train, held = _split_heldout(run, k, reward_pairs, [chunk_idx[p.index] for p in pairs])
    subsets = {"train": train, "heldout": held, "preference_heldout": run.preference_eval}
    before = _reward_evaluation(run, "before", subsets)
    log.write({"event": "iteration_start", "iteration": k, "pairs": len(pairs),
               "heldout_pairs": len(held), "generation_s": gen_s,
               "negative_tokens_mean": sum(len(p.negative_ids) for p in pairs) / len(pairs),
               "negatives_equal_demo": sum(p.negative_ids == p.demo_ids for p in pairs) / len(pairs)})
    reward_step(run.reward_trainer, train, run.preference_train, config.reward_steps,
                reward_loss_fn(config.reward_loss, run.encoder.tokenizer.pad_token_id),
                (config.seed, k), {"method": "rft", "phase": "reward", "iteration": k})
    log.write({"event": "reward_eval", "iteration": k, **before,
               **_reward_evaluation(run, "after", subsets)})
    _save_iteration(run, k, pairs, chunk, reward_pairs, held)
    policy_step(run.trainer, run.encoder.tokenizer, [p.prompt_ids for p in pairs],
                config.policy_steps, run.rewards, run.reference_logps, config, (config.seed, 3, k),
                {"method": "rft", "phase": "policy", "iteration": k}, run.window)
    if run.trainer.accelerator.is_main_process:
        save_pretrained_atomic(run.trainer.unwrapped, run.encoder.tokenizer,
                               run.out_dir / "iterations" / str(k) / "policy")


def run_rft(config, trainer: Trainer, encoder: Encoder, examples: list, out_dir: Path) -> dict:
    """All outer iterations; `trainer` holds the policy. Returns counts for the run_end record."""
    if trainer.accelerator.num_processes > 1:
        raise ValueError("RFT runs in one process for now (rollouts are not yet sharded across "
                         "processes)")
    chunks = iteration_chunks(len(examples), config.outer_iterations,
                              config.prompts_per_iteration, config.seed)
    run = _set_up(config, trainer, encoder, out_dir, len(examples))
    totals = {"pairs": 0, "negatives_truncated": 0, "demonstrations_truncated": 0}
    for k, chunk_idx in enumerate(chunks, start=1):
        _iteration(run, k, chunk_idx, examples, totals)
    totals["reward_optimizer_steps"] = run.reward_trainer.global_step
    return totals
