"""RFT (docs/algorithms.md §3): a reward model learnt from demonstrations, and RL against it.

    π_0 := initial policy = the KL reference π_ref
    for t in 0..T−1:
        next chunk of demonstrations (x, y); sample ỹ ~ π_t(·|x)          (negatives.make_negatives)
        reward step: `reward_steps` optimiser steps raising r(x, y) − r(x, ỹ)   (reward_model.py)
        policy step: `policy_steps` RLOO steps against r_{t+1}, each on fresh rollouts  (rloo.py)

Every optimiser step of both models is `Trainer.step`; both read the same token ids.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..checkpoint import Checkpoints
from ..data.sources import TRAIN_SEED, preference_pairs
from ..encoding import Encoder, Tokenized
from ..generation import forward_batch_size
from ..models import load_reward_model
from ..runio import atomic_write_jsonl, save_pretrained_atomic
from ..trainer import Trainer, iteration_chunks
from .negatives import make_negatives, negative_records, negative_stats
from .reward_model import (
    HeldOutDemonstrations,
    RewardPair,
    RewardScorer,
    encode_preference_pairs,
    evaluate_subsets,
    reward_loss_fn,
    reward_step,
    score_rows,
)
from .rloo import policy_step, sequence_logps_of


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
    heldout: HeldOutDemonstrations
    window: deque = field(default_factory=lambda: deque(maxlen=10))
    last_generation_s: float = 0.0

    @property
    def batch(self) -> int:
        """Sequences per scoring forward."""
        return forward_batch_size(self.config.generation_batch_size)

    @property
    def scorer(self):
        return self.trainer.accelerator.unwrap_model(self.reward_trainer.model)

    # Rewards and reference log-probs run under the training's autocast, as the policy's own
    # log-probs do in the loss: in one precision, KL = log π − log π_ref is 0 at the first step.
    def rewards(self, rows: list[Tokenized]) -> list[float]:
        pad = self.encoder.tokenizer.pad_token_id
        with self.trainer.accelerator.autocast():
            return score_rows(self.scorer, rows, pad, self.batch)

    def reference_logps(self, rows: list[Tokenized]) -> list[float]:
        pad, batch = self.encoder.tokenizer.pad_token_id, self.batch
        with self.trainer.accelerator.autocast():
            if self.reference is None:
                with self.trainer.unwrapped.disable_adapter():
                    return sequence_logps_of(self.trainer.unwrapped, rows, pad, batch)
            return sequence_logps_of(self.reference, rows, pad, batch)


_REFERENCE_NOTE = {
    True: "LoRA: the reference is the base model with the adapters disabled; no copy is held",
    False: "full fine-tuning: the reference is a frozen copy of the initial policy held in "
    "inference mode (no gradients, no optimiser state)",
}
_SIZE_KEYS = ("policy_param_bytes", "reference_param_bytes", "reward_model_param_bytes")


def _log_memory(run: _Run) -> None:
    sizes = [_param_bytes(m) for m in (run.trainer.unwrapped, run.reference, run.scorer.lm)]
    note = _REFERENCE_NOTE[run.reference is None]
    run.trainer.log.write({"event": "memory", **dict(zip(_SIZE_KEYS, sizes)), "note": note})
    if run.trainer.accelerator.is_main_process and run.config.show_progress:
        mib = ", ".join(
            f"{k[: -len('_param_bytes')]} {b / 2**20:.1f} MiB" for k, b in zip(_SIZE_KEYS, sizes)
        )
        print(f"RFT: {note}; parameters: {mib}")


def _set_up(config, trainer: Trainer, encoder: Encoder, out_dir: Path, n_examples: int) -> _Run:
    policy = trainer.unwrapped
    lora = hasattr(policy, "disable_adapter")
    reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = load_reward_model(
        config.reward_model or config.model, same_ids_as=encoder.tokenizer, seed=config.seed
    )[0]
    reward_config = replace(config, learning_rate=config.reward_learning_rate)
    reward_trainer = Trainer(
        reward_config, reward_model, trainer.accelerator, trainer.log, wrapper=RewardScorer
    )
    pref_train, pref_eval = [], []
    if config.preference_data:
        raw = preference_pairs(config.preference_data, None, TRAIN_SEED, task_count=1000)
        pref_train, pref_eval = encode_preference_pairs(raw, encoder, config)
    heldout = HeldOutDemonstrations(n_examples, config.heldout_fraction, config.seed)
    run = _Run(
        config, trainer, reward_trainer, encoder, out_dir, reference, pref_train, pref_eval, heldout
    )
    _log_memory(run)
    reward_trainer.start_schedule(config.outer_iterations * config.reward_steps)
    trainer.start_schedule(config.outer_iterations * config.policy_steps)
    return run


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


def _reward_phase(run: _Run, k: int, pairs: list, chunk: list, chunk_idx: list[int]) -> None:
    """Train the reward model on this iteration's pairs; evaluate it before and after."""
    config, tok = run.config, run.encoder.tokenizer
    reward_pairs = [RewardPair(p.prompt_ids, p.demo_ids, p.negative_ids) for p in pairs]
    train, held = run.heldout.split(k, reward_pairs, [chunk_idx[p.index] for p in pairs])
    subsets = {"train": train, "heldout": held, "preference_heldout": run.preference_eval}
    evaluation = (run.scorer, subsets, tok.pad_token_id, run.batch)
    before = evaluate_subsets(*evaluation, prefix="before")
    run.trainer.log.write(
        {
            "event": "iteration_start",
            "iteration": k,
            "pairs": len(pairs),
            "heldout_pairs": len(held),
            "generation_s": run.last_generation_s,
            **negative_stats(pairs),
        }
    )
    loss_fn = reward_loss_fn(config.reward_loss, tok.pad_token_id)
    context = {"method": "rft", "phase": "reward", "iteration": k}
    steps, prefs, seeds = config.reward_steps, run.preference_train, (config.seed, k)
    reward_step(run.reward_trainer, train, prefs, steps, loss_fn, seeds, context)
    after = evaluate_subsets(*evaluation, prefix="after")
    run.trainer.log.write({"event": "reward_eval", "iteration": k, **before, **after})
    _save_iteration(run, k, pairs, chunk, reward_pairs, held)


def _policy_phase(run: _Run, k: int, pairs: list) -> None:
    """RLOO steps of the policy against the reward model just trained; save the policy."""
    config, tok = run.config, run.encoder.tokenizer
    prompts = [p.prompt_ids for p in pairs]
    context = {"method": "rft", "phase": "policy", "iteration": k}
    scores, seeds = (run.rewards, run.reference_logps), (config.seed, 3, k)
    policy_step(
        run.trainer, tok, prompts, config.policy_steps, *scores, config, seeds, context, run.window
    )
    if run.trainer.accelerator.is_main_process:
        folder = run.out_dir / "iterations" / str(k)
        save_pretrained_atomic(run.trainer.unwrapped, tok, folder / "policy")


def run_rft(
    config, trainer: Trainer, encoder: Encoder, examples: list, out_dir: Path, ckpt=None
) -> dict:
    """All outer iterations; `trainer` holds the policy. Returns counts for the run_end record.
    Checkpoints (both models) at every outer-iteration end; a resumed run skips those done."""
    if trainer.accelerator.num_processes > 1:
        raise ValueError(
            "RFT runs in one process for now (rollouts are not yet sharded across processes)"
        )
    chunks = iteration_chunks(
        len(examples), config.outer_iterations, config.prompts_per_iteration, config.seed
    )
    ckpt = ckpt or Checkpoints.disabled()
    run = _set_up(config, trainer, encoder, out_dir, len(examples))
    totals = {"pairs": 0, "negatives_truncated": 0, "demonstrations_truncated": 0}
    done, totals = _checkpointing(run, ckpt, totals)
    for k, chunk_idx in enumerate(chunks, start=1):
        if k <= done[0]:
            continue
        chunk = [examples[i] for i in chunk_idx]
        started = time.perf_counter()
        pairs = make_negatives(config, trainer, encoder, chunk, k)  # sampled by π_{k−1}
        run.last_generation_s = time.perf_counter() - started
        totals["pairs"] += len(pairs)
        totals["negatives_truncated"] += sum(p.negative_truncated for p in pairs)
        totals["demonstrations_truncated"] += sum(p.demo_truncated for p in pairs)
        _reward_phase(run, k, pairs, chunk, chunk_idx)
        _policy_phase(run, k, pairs)
        done[0] = k
        ckpt.save()
    totals["reward_optimizer_steps"] = run.reward_trainer.global_step
    return totals


def _checkpointing(run: _Run, ckpt: Checkpoints, totals: dict) -> tuple[list[int], dict]:
    """Register the reward model and the outer-iteration state with the checkpoints; restore
    them when resuming. Returns ([iterations done], totals), the list shared with the state."""
    ckpt.register("reward_model", run.reward_trainer)
    done = [0]
    ckpt.state_fn = lambda: {
        "iteration": done[0],
        "totals": totals,
        "heldout_ids": sorted(run.heldout.ids),
        "heldout_trained": sorted(run.heldout.trained),
        "window": [list(w) for w in run.window],
        "preference_train": [asdict(p) for p in run.preference_train],
        "preference_eval": [asdict(p) for p in run.preference_eval],
    }
    state = ckpt.restore()
    if state is None:
        return done, totals
    done[0] = state["iteration"]
    totals.update(state["totals"])
    run.heldout.ids, run.heldout.trained = set(state["heldout_ids"]), set(state["heldout_trained"])
    run.window.extend(tuple(w) for w in state["window"])
    run.preference_train = [RewardPair(**p) for p in state["preference_train"]]
    run.preference_eval = [RewardPair(**p) for p in state["preference_eval"]]
    return done, totals
