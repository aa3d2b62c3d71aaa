"""IRFT and SPIN (docs/algorithms.md): T stages per pass over the demonstrations; each stage
samples one negative per prompt from the stage-start model, takes the reference log-probs with
those same weights, then trains the pairwise loss on (demonstration, negative) pairs. SPIN is
T = 1. The optimisation itself is `Trainer.fit`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import Checkpoints
from ..encoding import Encoder
from ..losses import implicit_rewards, nll, pairwise_loss
from ..pairs import Pair, pair_logps
from ..runio import atomic_write_jsonl
from ..trainer import Trainer, seeded_permutation, steps_per_epoch
from .negatives import make_negatives, negative_records, negative_stats


def irft_loss_fn(beta: float, loss_type: str, sft_weight: float, pad_id: int):
    def loss_fn(model, pairs: list[Pair]):
        demo, neg, demo_tokens, neg_tokens = pair_logps(model, pairs, pad_id)
        ref_demo = torch.tensor([p.ref_demo for p in pairs], device=demo.device)
        ref_neg = torch.tensor([p.ref_negative for p in pairs], device=demo.device)
        losses = pairwise_loss(demo, neg, ref_demo, ref_neg, beta, loss_type)
        if sft_weight:
            losses = losses + sft_weight * nll(demo) / demo_tokens.clamp(min=1)
        reward_demo = implicit_rewards(demo.detach(), ref_demo, beta)
        reward_neg = implicit_rewards(neg.detach(), ref_neg, beta)
        stats = {
            "reward_demo": reward_demo,
            "reward_negative": reward_neg,
            "margin": reward_demo - reward_neg,
            "pair_accuracy": (reward_demo > reward_neg).float()
            + 0.5 * (reward_demo == reward_neg).float(),
            "logp_demo": demo.detach(),
            "logp_negative": neg.detach(),
        }
        return losses, stats, (demo_tokens + neg_tokens).sum()

    return loss_fn


def count_pairs(pairs: list) -> float:
    return float(len(pairs))


def stage_chunks(n: int, stages: int, seed: int, iteration: int) -> list[list[int]]:
    """Shuffle with the seed, split into `stages` disjoint, near-equal chunks."""
    order = seeded_permutation(n, seed, iteration)
    return [order[t * n // stages : (t + 1) * n // stages] for t in range(stages)]


def _stage_plan(config, n_examples: int, global_batch: int):
    """(chunks of every iteration, optimiser steps of every stage)."""
    chunks_per_iteration = [
        stage_chunks(n_examples, config.stages, config.seed, it) for it in range(config.iterations)
    ]
    if min(len(c) for chunks in chunks_per_iteration for c in chunks) == 0:
        raise ValueError(
            f"{n_examples} examples cannot fill {config.stages} stages; lower `stages`"
        )
    steps = [
        config.epochs_per_stage * steps_per_epoch(len(c), global_batch)
        for chunks in chunks_per_iteration
        for c in chunks
    ]
    return chunks_per_iteration, steps


def _sample_stage(
    config, trainer: Trainer, encoder: Encoder, chunk: list, stage_id: int, out_dir: Path, engine
):
    """The stage's pairs (negatives and reference log-probs), its truncation counts and the
    seconds it took; the negatives are written to stages/<k>/negatives.jsonl."""
    started = time.perf_counter()
    prompts_cut_before = encoder.counts.prompts_cut  # every process renders every prompt
    pairs = make_negatives(config, trainer, encoder, chunk, stage_id, engine=engine)
    gen_time = time.perf_counter() - started
    cuts = {
        "prompts_truncated": encoder.counts.prompts_cut - prompts_cut_before,
        "demonstrations_truncated": sum(p.demo_truncated for p in pairs),
        "negatives_truncated": sum(p.negative_truncated for p in pairs),
        "pairs": len(pairs),
    }
    if trainer.accelerator.is_main_process:
        atomic_write_jsonl(
            out_dir / "stages" / str(stage_id) / "negatives.jsonl",
            negative_records(pairs, chunk, encoder.tokenizer),
        )
    return pairs, cuts, gen_time


def _stage_start_record(pairs: list[Pair], gen_time: float, cuts: dict, **where) -> dict:
    n = len(pairs)
    return {
        "event": "stage_start",
        **where,
        "pairs": n,
        "generation_s": gen_time,
        **negative_stats(pairs),
        "ref_logp_demo_mean": sum(p.ref_demo for p in pairs) / n,
        "ref_logp_negative_mean": sum(p.ref_negative for p in pairs) / n,
        **cuts,
    }


def _pair_dicts(pairs: list[Pair]) -> list[dict]:
    return [asdict(p) for p in pairs]


def _stage_pairs(config, trainer, encoder, chunk, where: dict, out_dir, resumed, engine) -> tuple:
    """The stage's pairs and truncation counts: from the checkpoint being resumed inside this
    stage (nothing regenerated), else sampled now (and the stage_start record written)."""
    if resumed is not None:
        return [Pair(**p) for p in resumed["pairs"]], resumed["cuts"]
    stage_id = where["stage"]
    pairs, cuts, gen_time = _sample_stage(
        config, trainer, encoder, chunk, stage_id, out_dir, engine
    )
    record = _stage_start_record(pairs, gen_time, cuts, **where)
    trainer.log.write({**record, **trainer.parking_record()})
    return pairs, cuts


def _start_stage_schedule(config, trainer: Trainer, steps: int) -> None:
    if config.schedule_scope == "stage" or config.optimizer_scope == "stage":
        trainer.start_schedule(steps)


def _stages_done(ckpt: Checkpoints, at: dict) -> int:
    """Stages a resumed run skips. A checkpoint at a stage boundary is restored here (into
    `at`); one inside a stage is restored when that stage, rebuilt from its stored pairs,
    starts."""
    pending = ckpt.pending
    if pending is None:
        return 0
    if pending["done"]:
        at.update(ckpt.restore())
        return at["stage"]
    return pending["stage"] - 1


def _call_stage_end(on_stage_end, trainer: Trainer, stage_id: int) -> None:
    if on_stage_end is not None:
        with trainer.inference_model() as model:  # collective when sharded
            if trainer.accelerator.is_main_process:
                on_stage_end(model, stage_id)


def run_irft(
    config,
    trainer: Trainer,
    encoder: Encoder,
    examples: list,
    out_dir: Path,
    on_stage_end=None,
    ckpt=None,
    *,
    engine,
) -> dict:
    """All stages of all iterations; returns the truncation counts of the run. Negatives are
    sampled through `engine`, the run's GenerationEngine. Checkpoints at
    every stage end (and every `save_steps`, with the stage's pairs); a resumed run skips the
    stages done and continues inside the checkpoint's stage with its stored pairs."""
    ckpt = ckpt or Checkpoints.disabled()
    chunks_per_iteration, steps = _stage_plan(config, len(examples), trainer.global_batch)
    if config.schedule_scope == "run" and config.optimizer_scope == "run":
        trainer.start_schedule(sum(steps))
    pad = encoder.tokenizer.pad_token_id
    loss_fn = irft_loss_fn(config.beta, config.loss_type, config.sft_weight, pad)
    keys = ("prompts_truncated", "demonstrations_truncated", "negatives_truncated", "pairs")
    at = {"stage": 0, "done": True, "totals": dict.fromkeys(keys, 0), "pairs": [], "cuts": {}}
    ckpt.state_fn = lambda: {**at, "fit": trainer.position}
    skip_through = _stages_done(ckpt, at)
    stage_id = 0
    for iteration, chunks in enumerate(chunks_per_iteration):
        for t, chunk_idx in enumerate(chunks):
            stage_id += 1
            if stage_id <= skip_through:
                continue
            inside = ckpt.pending if stage_id == skip_through + 1 else None
            chunk = [examples[i] for i in chunk_idx]
            where = {"stage": stage_id, "iteration": iteration, "stage_in_iteration": t}
            if config.optimizer_scope == "stage":  # before sampling: frees the state meanwhile
                trainer.reset_optimizer()
            pairs, cuts = _stage_pairs(
                config, trainer, encoder, chunk, where, out_dir, inside, engine
            )
            if inside is None:
                totals = {k: at["totals"][k] + v for k, v in cuts.items()}
                at.update(stage=stage_id, done=False, totals=totals)
                at.update(pairs=_pair_dicts(pairs), cuts=cuts)
            _start_stage_schedule(config, trainer, steps[stage_id - 1])
            resumed = ckpt.restore() if inside is not None else None
            if resumed is not None:
                at.update({k: v for k, v in resumed.items() if k != "fit"})
            trainer.fit(
                pairs,
                loss_fn,
                count_pairs,
                config.epochs_per_stage,
                seed_parts=(config.seed, stage_id),
                context={"method": config.method, "stage": stage_id, "iteration": iteration},
                desc=f"stage {stage_id}: training",
                start=resumed["fit"] if resumed else None,
            )
            _call_stage_end(on_stage_end, trainer, stage_id)
            at.update(done=True, pairs=[], cuts={})
            ckpt.save()
    return at["totals"]
