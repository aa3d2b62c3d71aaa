"""RFT (docs/algorithms.md §3): a reward model learnt from demonstrations, and RL against it.

    π_0 := initial policy = the KL reference π_ref
    for t in 0..T−1:
        next chunk of demonstrations (x, y); sample ỹ ~ π_t(·|x)          (negatives.make_negatives)
        reward step: `reward_steps` optimiser steps raising r(x, y) − r(x, ỹ)   (reward_model.py)
        policy step: `policy_steps` RLOO steps against r_{t+1}, each on fresh rollouts  (rloo.py)

Every optimiser step of both models is `Trainer.step`; both read the same token ids. What the
iterations share (reference, reward model, held-out split) and what the checkpoints keep (`State`)
is in rft_state.py.

Under `accelerate launch` every process holds the policy, its reference and the reward model;
negatives, rollouts and the scores of both are computed in shares and gathered, so every process
sees the same pairs and groups, and `Trainer.step` splits each global batch between processes.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from ..config import config_to_dict
from ..modelcard import read_records, reward_model_card
from ..pairs import pair_rows
from ..progress import progress_bar
from ..runio import atomic_write_jsonl, save_pretrained_atomic
from ..trainer import iteration_chunks
from .context import RunContext
from .negatives import make_negatives, negative_records, negative_stats
from .reward_model import (
    evaluate_subsets,
    reward_loss_fn,
    reward_step,
)
from .rft_state import RFTRun, State, read_preference_data, set_up_run
from .rloo import PolicyPhase, Rollouts, policy_step


def _save_iteration(run: RFTRun, k: int, pairs, chunk, held) -> None:
    """Negatives with the scores of the reward model this iteration trained (r_k). Written by the
    main process; no process reads them during the run, so nobody waits for them."""
    tokenizer = run.encoder.tokenizer
    records = negative_records(pairs, chunk, tokenizer)
    scores = run.shared(pair_rows(pairs), run.rewards)
    r_demo, r_neg = scores[: len(pairs)], scores[len(pairs) :]
    held_ids = {id(p) for p in held}
    for rec, pair, rd, rn in zip(records, pairs, r_demo, r_neg):
        rec["policy_logp_demonstration"] = rec.pop("ref_logp_demonstration")
        rec["policy_logp_negative"] = rec.pop("ref_logp_negative")
        rec.update(reward_demonstration=rd, reward_negative=rn, heldout=id(pair) in held_ids)
    if run.trainer.accelerator.is_main_process:
        folder = run.out_dir / "iterations" / str(k)
        atomic_write_jsonl(folder / "negatives.jsonl", records)
        records = read_records(run.out_dir / "metrics.jsonl")
        card = reward_model_card(config_to_dict(run.config), records, k)
        save_pretrained_atomic(run.scorer.lm, tokenizer, folder / "reward_model", card=card)


@contextmanager
def _steps_bar(run: RFTRun, desc: str, total: int):
    """A progress bar over a phase's optimiser steps, advanced as each step's record is logged:
    on a real model a phase takes minutes, which showed nothing after the negatives' bar."""
    show = run.config.show_progress and run.trainer.accelerator.is_main_process
    with progress_bar(desc, total=total, enabled=show) as advance:
        run.trainer.log.on_step = advance
        try:
            yield
        finally:
            run.trainer.log.on_step = None


def _reward_phase(run: RFTRun, k: int, pairs: list, chunk: list, chunk_idx: list[int]) -> None:
    """Train the reward model on this iteration's pairs; evaluate it before and after."""
    config, tok = run.config, run.encoder.tokenizer
    # The reward step trains on the very pairs: demonstration ≻ negative, weight 1.
    train, held = run.heldout.split(k, pairs, [chunk_idx[p.index] for p in pairs])
    subsets = {"train": train, "heldout": held, "preference_heldout": run.state.preference_eval}
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
    steps, prefs, seeds = config.reward_steps, run.state.preference_train, (config.seed, k)
    with _steps_bar(run, f"iteration {k}: reward model", steps):
        reward_step(run.reward_trainer, train, prefs, steps, loss_fn, seeds, context)
    after = evaluate_subsets(run.margins, subsets, prefix="after")
    run.trainer.log.write({"event": "reward_eval", "iteration": k, **before, **after})
    _save_iteration(run, k, pairs, chunk, held)


def _policy_phase(run: RFTRun, k: int, pairs: list) -> None:
    """RLOO steps of the policy against the reward model just trained; save the policy."""
    config, tok = run.config, run.encoder.tokenizer
    prompts = [p.prompt_ids for p in pairs]
    context = {"method": "rft", "phase": "policy", "iteration": k}
    rollouts = Rollouts(run.engine, run.rewards, run.reference_logps)
    phase = PolicyPhase(config.policy_steps, (config.seed, 3, k), context, run.state.window)
    with _steps_bar(run, f"iteration {k}: policy (RLOO)", config.policy_steps):
        policy_step(run.trainer, tok, prompts, rollouts, config, phase)
    if run.trainer.accelerator.is_main_process:
        folder = run.out_dir / "iterations" / str(k)
        save_pretrained_atomic(run.trainer.unwrapped, tok, folder / "policy")


def off_policy_warning(config) -> str | None:
    """RLOO's unbiased gradient and its KL estimate assume rollouts drawn from π itself
    (docs/algorithms.md §3); tempered or nucleus sampling draws them from another distribution."""
    if config.temperature == 1 and config.top_p == 1:
        return None
    return (
        f"warning: RFT samples rollouts with temperature={config.temperature} and "
        f"top_p={config.top_p}, not from the policy itself: RLOO's gradient and its KL estimate "
        "are biased (temperature=1 top_p=1 keeps them unbiased)"
    )


def check(config, n_examples: int) -> None:
    """Before the run folder is taken: every outer iteration gets its chunk of prompts, and
    preference_data reads as pairs (a wrong file fails here, not after the folder is taken). A
    resumed run takes its pairs from its checkpoint: the source need not be there any more."""
    iteration_chunks(n_examples, config.outer_iterations, config.prompts_per_iteration, config.seed)
    if config.preference_data and not config.resume:
        read_preference_data(config)


def run(ctx: RunContext) -> dict:
    """All outer iterations; `ctx.trainer` holds the policy. Returns counts for the run_end
    record. Checkpoints (both models) at every outer-iteration end; a resumed run skips those
    done."""
    config, trainer, encoder, state = ctx.config, ctx.trainer, ctx.encoder, ctx.state
    chunks = iteration_chunks(
        len(ctx.examples), config.outer_iterations, config.prompts_per_iteration, config.seed
    )
    warning = off_policy_warning(config)
    if warning and trainer.accelerator.is_main_process:
        print(warning, file=sys.stderr)
    run = set_up_run(ctx)
    ctx.checkpoints.register("reward_model", run.reward_trainer)
    ctx.checkpoints.restore()  # an outer-iteration boundary (none: a fresh run)
    for k, chunk_idx in enumerate(chunks, start=1):
        if k <= state.iteration:
            continue
        chunk = [ctx.examples[i] for i in chunk_idx]
        started = time.perf_counter()
        pairs = make_negatives(config, trainer, encoder, chunk, k, engine=ctx.engine)  # by π_{k−1}
        run.last_generation_s = time.perf_counter() - started
        state.add_negatives(pairs)
        _reward_phase(run, k, pairs, chunk, chunk_idx)
        _policy_phase(run, k, pairs)
        state.iteration = k
        ctx.checkpoints.save()
    return {**state.totals, "reward_optimizer_steps": run.reward_trainer.global_step}


__all__ = ["State", "check", "run"]
