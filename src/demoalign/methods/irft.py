"""IRFT and SPIN (docs/algorithms.md): T stages per pass over the demonstrations; each stage
samples one negative per prompt from the stage-start model, takes the reference log-probs with
those same weights, then trains the pairwise loss on (demonstration, negative) pairs. SPIN is
T = 1. The optimisation itself is `Trainer.fit`; where a run is lives in `State`, which the
checkpoints keep."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..encoding import Encoder
from ..losses import implicit_rewards, nll, pairwise_loss
from ..pairs import Pair, pair_from_dict, pair_logps
from ..runio import atomic_write_jsonl
from ..trainer import FitPlan, Trainer, seeded_permutation, steps_per_epoch
from .context import RunContext
from .negatives import make_negatives, negative_records, negative_stats


def irft_loss_fn(beta: float, loss_type: str, sft_weight: float, pad_id: int):
    def loss_fn(model, pairs: list[Pair]):
        demo, neg, demo_tokens, neg_tokens = pair_logps(model, pairs, pad_id)
        ref_demo = torch.tensor([p.ref_chosen for p in pairs], device=demo.device)
        ref_neg = torch.tensor([p.ref_rejected for p in pairs], device=demo.device)
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


def check(config, n_examples: int) -> None:
    """Before the run folder is taken: every stage of every pass gets at least one example."""
    if n_examples < config.stages:
        raise ValueError(
            f"{n_examples} examples cannot fill {config.stages} stages; lower `stages`"
        )


def _stage_plan(config, n_examples: int, global_batch: int):
    """(chunks of every iteration, optimiser steps of every stage)."""
    check(config, n_examples)
    chunks_per_iteration = [
        stage_chunks(n_examples, config.stages, config.seed, it) for it in range(config.iterations)
    ]
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
        "demonstrations_truncated": sum(p.chosen_truncated for p in pairs),
        "negatives_truncated": sum(p.rejected_truncated for p in pairs),
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
        "ref_logp_demo_mean": sum(p.ref_chosen for p in pairs) / n,
        "ref_logp_negative_mean": sum(p.ref_rejected for p in pairs) / n,
        **cuts,
    }


TOTAL_KEYS = ("prompts_truncated", "demonstrations_truncated", "negatives_truncated", "pairs")


@dataclass
class State:
    """Where an IRFT run is, as its checkpoints keep it: the stage last started and whether it
    ended, the truncation counts so far, and the started stage's pairs and counts (sampled
    negatives and their reference log-probs cannot be recomputed)."""

    stage: int = 0
    done: bool = True
    totals: dict = field(default_factory=lambda: dict.fromkeys(TOTAL_KEYS, 0))
    pairs: list[Pair] = field(default_factory=list)
    cuts: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "done": self.done,
            "totals": dict(self.totals),
            "pairs": [asdict(p) for p in self.pairs],
            "cuts": dict(self.cuts),
        }

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.done = state["stage"], state["done"]
        self.totals, self.cuts = dict(state["totals"]), dict(state["cuts"])
        self.pairs = [pair_from_dict(p) for p in state["pairs"]]

    def start_stage(self, stage: int, pairs: list[Pair], cuts: dict) -> None:
        self.totals = {k: self.totals[k] + v for k, v in cuts.items()}
        self.stage, self.done, self.pairs, self.cuts = stage, False, pairs, cuts

    def end_stage(self) -> None:
        self.done, self.pairs, self.cuts = True, [], {}

    def is_done(self, stage: int) -> bool:
        return stage < self.stage or (stage == self.stage and self.done)

    def is_inside(self, stage: int) -> bool:
        """Whether the run stopped inside this stage (its pairs are here; nothing regenerated)."""
        return stage == self.stage and not self.done


def _stages(chunks_per_iteration: list[list[list[int]]]):
    """(where: stage, iteration, stage_in_iteration; the stage's chunk of example indices)."""
    stage = 0
    for iteration, chunks in enumerate(chunks_per_iteration):
        for t, chunk_idx in enumerate(chunks):
            stage += 1
            yield {"stage": stage, "iteration": iteration, "stage_in_iteration": t}, chunk_idx


def _new_stage(ctx: RunContext, chunk: list, where: dict) -> None:
    """Sample the stage's pairs, log its stage_start record, and make it the state's stage."""
    trainer = ctx.trainer
    pairs, cuts, gen_time = _sample_stage(
        ctx.config, trainer, ctx.encoder, chunk, where["stage"], ctx.out_dir, ctx.engine
    )
    record = _stage_start_record(pairs, gen_time, cuts, **where)
    trainer.log.write({**record, **trainer.parking_record()})
    ctx.state.start_stage(where["stage"], pairs, cuts)


def _start_stage_schedule(config, trainer: Trainer, steps: int) -> None:
    if config.schedule_scope == "stage" or config.optimizer_scope == "stage":
        trainer.start_schedule(steps)


def _call_stage_end(on_stage_end, trainer: Trainer, stage_id: int) -> None:
    if on_stage_end is not None:
        with trainer.inference_model() as model:  # collective when sharded
            if trainer.accelerator.is_main_process:
                on_stage_end(model, stage_id)


def _fit_plan(ctx: RunContext, where: dict, resume: bool) -> FitPlan:
    config, stage = ctx.config, where["stage"]
    pad = ctx.encoder.tokenizer.pad_token_id
    return FitPlan(
        irft_loss_fn(config.beta, config.loss_type, config.sft_weight, pad),
        count_pairs,
        config.epochs_per_stage,
        seed_parts=(config.seed, stage),
        context={"method": config.method, "stage": stage, "iteration": where["iteration"]},
        desc=f"stage {stage}: training",
        resume=resume,
        after_step=ctx.checkpoints.after_step,
    )


def run(ctx: RunContext) -> dict:
    """All stages of all iterations; returns the truncation counts of the run. Checkpoints at
    every stage end (and every `save_steps`, with the stage's pairs); a resumed run skips the
    stages done and continues inside the checkpoint's stage with its stored pairs."""
    config, trainer, state = ctx.config, ctx.trainer, ctx.state
    chunks_per_iteration, steps = _stage_plan(config, len(ctx.examples), trainer.global_batch)
    if config.schedule_scope == "run" and config.optimizer_scope == "run":
        trainer.start_schedule(sum(steps))
    if state.done:
        ctx.checkpoints.restore()  # a checkpoint at a stage boundary (none: a fresh run)
    for where, chunk_idx in _stages(chunks_per_iteration):
        stage = where["stage"]
        if state.is_done(stage):
            continue
        inside = state.is_inside(stage)
        if config.optimizer_scope == "stage":  # before sampling: frees the state meanwhile
            trainer.reset_optimizer()
        if not inside:
            _new_stage(ctx, [ctx.examples[i] for i in chunk_idx], where)
        _start_stage_schedule(config, trainer, steps[stage - 1])
        if inside:
            ctx.checkpoints.restore()  # inside a stage: once its schedule exists
        trainer.fit(state.pairs, _fit_plan(ctx, where, resume=inside))
        _call_stage_end(ctx.on_stage_end, trainer, stage)
        state.end_stage()
        ctx.checkpoints.save()
    return state.totals
