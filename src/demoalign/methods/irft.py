"""IRFT and SPIN (docs/algorithms.md): T stages per pass over the demonstrations; each stage
samples one negative per prompt from the stage-start model, takes the reference log-probs with
those same weights, then trains the pairwise loss on (demonstration, negative) pairs. SPIN is
T = 1. The optimisation itself is `Trainer.fit`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..encoding import Encoder
from ..generation import generate_ids
from ..losses import implicit_rewards, nll, pairwise_loss
from ..pairs import Pair, fill_reference_logps, pair_logps
from ..runio import atomic_write_jsonl
from ..trainer import Trainer, seeded_permutation, steps_per_epoch


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
            "pair_accuracy": (reward_demo > reward_neg).float() + 0.5 * (reward_demo == reward_neg).float(),
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


def make_negatives(config, trainer: Trainer, encoder: Encoder, chunk: list, stage_id: int) -> list[Pair]:
    """Sample one negative per prompt with the current model, then its reference log-probs with the
    SAME weights; each process does its share, and everyone gets all pairs."""
    acc = trainer.accelerator
    model = trainer.unwrapped
    tok = encoder.tokenizer
    prompts = [encoder.prompt_ids(e) for e in chunk]
    # Each negative is then cut to its own room by `encoder.fit`, like its demonstration.
    room = config.max_length - min(len(p) for p in prompts)
    with acc.autocast():
        generated = generate_ids(
            model, tok, prompts,
            max_new_tokens=max(1, min(config.max_new_tokens, room)),
            temperature=config.temperature, top_p=config.top_p, greedy=config.greedy,
            batch_size=config.generation_batch_size, seed=config.seed * 7919 + stage_id,
            process_index=acc.process_index, num_processes=acc.num_processes,
            desc=f"stage {stage_id}: negatives", show_progress=config.show_progress and acc.is_main_process,
        )
    mine = []
    for i, neg_ids in sorted(generated.items()):
        demo_ids = encoder.response_ids(chunk[i].response)
        neg_ids = neg_ids or [tok.eos_token_id]
        demo = encoder.fit(prompts[i], demo_ids)
        neg = encoder.fit(prompts[i], neg_ids)
        mine.append(Pair(i, demo.prompt_ids, demo.response_ids, neg.response_ids,
                         demo_truncated=len(demo.response_ids) < len(demo_ids),
                         negative_truncated=len(neg.response_ids) < len(neg_ids)))
    fill_reference_logps(model, mine, tok.pad_token_id, config.generation_batch_size, acc.autocast)
    if acc.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return sorted(gather_object(mine), key=lambda p: p.index)


def negative_records(pairs: list[Pair], chunk: list, tokenizer) -> list[dict]:
    records = []
    for p in pairs:
        example = chunk[p.index]
        records.append({
            "prompt": example.prompt,
            "history": [list(turn) for turn in example.history],
            "demonstration": example.response,
            "negative": tokenizer.decode(p.negative_ids, skip_special_tokens=True),
            "ref_logp_demonstration": p.ref_demo,
            "ref_logp_negative": p.ref_negative,
            "negative_tokens": len(p.negative_ids),
            "negative_finished": bool(p.negative_ids) and p.negative_ids[-1] == tokenizer.eos_token_id,
        })
    return records


def run_irft(config, trainer: Trainer, encoder: Encoder, examples: list, out_dir: Path, on_stage_end=None) -> dict:
    """All stages of all iterations; returns the truncation counts of the run."""
    acc = trainer.accelerator
    chunks_per_iteration = [stage_chunks(len(examples), config.stages, config.seed, it) for it in range(config.iterations)]
    if min(len(c) for chunks in chunks_per_iteration for c in chunks) == 0:
        raise ValueError(f"{len(examples)} examples cannot fill {config.stages} stages; lower `stages`")
    steps = [config.epochs_per_stage * steps_per_epoch(len(c), trainer.global_batch)
             for chunks in chunks_per_iteration for c in chunks]
    if config.schedule_scope == "run":
        trainer.start_schedule(sum(steps))
    loss_fn = irft_loss_fn(config.beta, config.loss_type, config.sft_weight, encoder.tokenizer.pad_token_id)
    stage_id = 0
    totals = {"prompts_truncated": 0, "demonstrations_truncated": 0, "negatives_truncated": 0, "pairs": 0}
    for iteration, chunks in enumerate(chunks_per_iteration):
        for t, chunk_idx in enumerate(chunks):
            stage_id += 1
            chunk = [examples[i] for i in chunk_idx]
            started = time.perf_counter()
            prompts_cut_before = encoder.counts.prompts_cut  # every process renders every prompt
            pairs = make_negatives(config, trainer, encoder, chunk, stage_id)
            gen_time = time.perf_counter() - started
            cuts = {
                "prompts_truncated": encoder.counts.prompts_cut - prompts_cut_before,
                "demonstrations_truncated": sum(p.demo_truncated for p in pairs),
                "negatives_truncated": sum(p.negative_truncated for p in pairs),
                "pairs": len(pairs),
            }
            totals = {k: totals[k] + v for k, v in cuts.items()}
            if acc.is_main_process:
                atomic_write_jsonl(out_dir / "stages" / str(stage_id) / "negatives.jsonl",
                                   negative_records(pairs, chunk, encoder.tokenizer))
            trainer.log.write({
                "event": "stage_start", "stage": stage_id, "iteration": iteration, "stage_in_iteration": t,
                "pairs": len(pairs), "generation_s": gen_time,
                "negative_tokens_mean": sum(len(p.negative_ids) for p in pairs) / len(pairs),
                # A negative identical to its demonstration gives no gradient (u ≡ 0 for that pair).
                "negatives_equal_demo": sum(p.negative_ids == p.demo_ids for p in pairs) / len(pairs),
                "ref_logp_demo_mean": sum(p.ref_demo for p in pairs) / len(pairs),
                "ref_logp_negative_mean": sum(p.ref_negative for p in pairs) / len(pairs),
                **cuts,
            })
            if config.schedule_scope == "stage":
                trainer.start_schedule(steps[stage_id - 1])
            trainer.fit(
                pairs, loss_fn, count_pairs, config.epochs_per_stage,
                seed_parts=(config.seed, stage_id), context={"method": config.method, "stage": stage_id, "iteration": iteration},
                desc=f"stage {stage_id}: training",
            )
            if on_stage_end is not None and acc.is_main_process:
                on_stage_end(trainer.unwrapped, stage_id)
    return totals
