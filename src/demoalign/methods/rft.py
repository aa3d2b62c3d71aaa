"""RFT (docs/algorithms.md §3): a reward model learnt from demonstrations, and RL against it.

    π_0 := initial policy = the KL reference π_ref
    for t in 0..T−1:
        next chunk of demonstrations (x, y); sample ỹ ~ π_t(·|x)          (negatives.make_negatives)
        reward step: `reward_steps` optimiser steps raising r(x, y) − r(x, ỹ)   (reward_model.py)
        policy step: `policy_steps` RLOO steps against r_{t+1}, each on fresh rollouts  (rloo.py)

Every optimiser step of both models is `Trainer.step`; both read the same token ids. The
state shared across iterations (reference, reward model, held-out split) is in rft_state.py.

Under `accelerate launch` every process holds the policy, its reference and the reward model;
negatives, rollouts and the scores of both are computed in shares and gathered, so every process
sees the same pairs and groups, and `Trainer.step` splits each global batch between processes.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint import Checkpoints
from ..encoding import Encoder, Tokenized
from ..runio import atomic_write_jsonl, save_pretrained_atomic
from ..trainer import Trainer, iteration_chunks
from .negatives import make_negatives, negative_records, negative_stats
from .reward_model import (
    RewardPair,
    evaluate_subsets,
    reward_loss_fn,
    reward_step,
)
from .rft_state import RFTRun, checkpoint_run_state, set_up_run
from .rloo import Rollouts, policy_step


def _save_iteration(run: RFTRun, k: int, pairs, chunk, reward_pairs, held) -> None:
    """Negatives with the scores of the reward model this iteration trained (r_k). Written by the
    main process; no process reads them during the run, so nobody waits for them."""
    tokenizer = run.encoder.tokenizer
    records = negative_records(pairs, chunk, tokenizer)
    rows = [Tokenized(p.prompt_ids, p.demo_ids) for p in pairs]
    rows += [Tokenized(p.prompt_ids, p.negative_ids) for p in pairs]
    scores = run.shared(rows, run.rewards)
    r_demo, r_neg = scores[: len(pairs)], scores[len(pairs) :]
    held_ids = {id(p) for p in held}
    for rec, pair, rd, rn in zip(records, reward_pairs, r_demo, r_neg):
        rec["policy_logp_demonstration"] = rec.pop("ref_logp_demonstration")
        rec["policy_logp_negative"] = rec.pop("ref_logp_negative")
        rec.update(reward_demonstration=rd, reward_negative=rn, heldout=id(pair) in held_ids)
    if run.trainer.accelerator.is_main_process:
        folder = run.out_dir / "iterations" / str(k)
        atomic_write_jsonl(folder / "negatives.jsonl", records)
        save_pretrained_atomic(run.scorer.lm, tokenizer, folder / "reward_model")


def _reward_phase(run: RFTRun, k: int, pairs: list, chunk: list, chunk_idx: list[int]) -> None:
    """Train the reward model on this iteration's pairs; evaluate it before and after."""
    config, tok = run.config, run.encoder.tokenizer
    reward_pairs = [RewardPair(p.prompt_ids, p.demo_ids, p.negative_ids) for p in pairs]
    train, held = run.heldout.split(k, reward_pairs, [chunk_idx[p.index] for p in pairs])
    subsets = {"train": train, "heldout": held, "preference_heldout": run.preference_eval}
    before = evaluate_subsets(run.margins, subsets, prefix="before")
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
    after = evaluate_subsets(run.margins, subsets, prefix="after")
    run.trainer.log.write({"event": "reward_eval", "iteration": k, **before, **after})
    _save_iteration(run, k, pairs, chunk, reward_pairs, held)


def _policy_phase(run: RFTRun, k: int, pairs: list) -> None:
    """RLOO steps of the policy against the reward model just trained; save the policy."""
    config, tok = run.config, run.encoder.tokenizer
    prompts = [p.prompt_ids for p in pairs]
    context = {"method": "rft", "phase": "policy", "iteration": k}
    rollouts = Rollouts(run.engine, run.rewards, run.reference_logps)
    seeds = (config.seed, 3, k)
    policy_step(
        run.trainer, tok, prompts, config.policy_steps, rollouts, config, seeds, context, run.window
    )
    if run.trainer.accelerator.is_main_process:
        folder = run.out_dir / "iterations" / str(k)
        save_pretrained_atomic(run.trainer.unwrapped, tok, folder / "policy")


def run_rft(
    config,
    trainer: Trainer,
    encoder: Encoder,
    examples: list,
    out_dir: Path,
    ckpt=None,
    *,
    engine,
) -> dict:
    """All outer iterations; `trainer` holds the policy, which samples negatives and rollouts
    through `engine` (the run's GenerationEngine). Returns counts for the run_end record.
    Checkpoints (both models) at every outer-iteration end; a resumed run skips those done."""
    chunks = iteration_chunks(
        len(examples), config.outer_iterations, config.prompts_per_iteration, config.seed
    )
    ckpt = ckpt or Checkpoints.disabled()
    run = set_up_run(config, trainer, encoder, out_dir, len(examples), engine)
    totals = {"pairs": 0, "negatives_truncated": 0, "demonstrations_truncated": 0}
    done, totals = checkpoint_run_state(run, ckpt, totals)
    for k, chunk_idx in enumerate(chunks, start=1):
        if k <= done[0]:
            continue
        chunk = [examples[i] for i in chunk_idx]
        started = time.perf_counter()
        pairs = make_negatives(config, trainer, encoder, chunk, k, engine=engine)  # by π_{k−1}
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
