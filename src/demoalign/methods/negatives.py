"""Negatives: one sample per prompt from the current weights, then the reference log-probs of
(demonstration, negative) with those same weights (docs/algorithms.md §2). IRFT/SPIN stages and
RFT iterations both start here; each process samples its share and everyone gets all pairs."""

from __future__ import annotations

from accelerate.utils import gather_object

from ..encoding import Encoder
from ..generation import (
    GenerationEngine,
    SamplingOptions,
    Share,
    check_one_each,
    forward_batch_size,
    generate_ids,
)
from ..pairs import Pair, fill_reference_logps, fit_pair
from ..trainer import Trainer


def _sample(engine: GenerationEngine, config, model, acc, prompts: list, stage_id: int, tok):
    """{index: negative ids} of this process's share, and their token log-probs (an empty dict
    unless reference_logps=decode)."""
    decode = getattr(config, "reference_logps", "forward") == "decode"
    # Each negative is then cut to its own room by `encoder.fit`, like its demonstration.
    room = config.max_length - min(len(p) for p in prompts)
    options = SamplingOptions(
        max_new_tokens=max(1, min(config.max_new_tokens, room)),
        temperature=config.temperature,
        top_p=config.top_p,
        greedy=config.greedy,
        batch_size=config.generation_batch_size,
        backend=config.generation_backend,
        seed=config.seed * 7919 + stage_id,
    )
    unit = "iteration" if config.method == "rft" else "stage"  # RFT's words for its loop
    share = Share.of(acc, f"{unit} {stage_id}: negatives", config.show_progress)
    with acc.autocast():
        generated = generate_ids(engine, model, tok, prompts, options, share, return_logps=decode)
    return generated if decode else (generated, {})


def make_negatives(
    config,
    trainer: Trainer,
    encoder: Encoder,
    chunk: list,
    stage_id: int,
    *,
    engine: GenerationEngine,
) -> list[Pair]:
    """Sample one negative per prompt with the current model (through the run's `engine`), then
    its reference log-probs with the SAME weights; each process does its share, and everyone gets
    all pairs. With reference_logps=decode the negatives' come from the logits they were sampled
    from."""
    with trainer.inference_model() as model:
        mine = _my_pairs(engine, config, model, trainer, encoder, chunk, stage_id)
    if trainer.accelerator.num_processes == 1:
        return mine
    pairs = sorted(gather_object(mine), key=lambda p: p.index)
    check_one_each([p.index for p in pairs], len(chunk), "negatives")
    return pairs


def _my_pairs(
    engine: GenerationEngine, config, model, trainer, encoder: Encoder, chunk: list, stage_id: int
) -> list[Pair]:
    tok, acc, padding_free = encoder.tokenizer, trainer.accelerator, trainer.padding_free
    prompts = [encoder.prompt_ids(e) for e in chunk]
    # RFT's negatives train a reward model: no reference log-probs of theirs are used.
    decode = getattr(config, "reference_logps", "forward") == "decode"
    generated, decoded = _sample(engine, config, model, acc, prompts, stage_id, tok)
    mine, forward = [], []
    for i, neg_ids in sorted(generated.items()):
        demo_ids = encoder.response_ids(chunk[i].response)
        pair = fit_pair(encoder, prompts[i], demo_ids, neg_ids or [tok.eos_token_id], index=i)
        token_logps = decoded.get(i, [])
        if decode and neg_ids and len(token_logps) >= len(pair.rejected_ids):
            pair.ref_rejected = sum(token_logps[: len(pair.rejected_ids)])  # the kept tokens only
        else:
            forward.append(pair)  # an empty generation became a bare EOS: nothing decoded it
        mine.append(pair)
    batch = forward_batch_size(config.generation_batch_size)
    if decode:
        decoded_pairs = [p for p in mine if all(p is not f for f in forward)]
        fill_reference_logps(
            model, decoded_pairs, tok.pad_token_id, batch, acc.autocast, False, padding_free
        )
    scored = forward if decode else mine
    fill_reference_logps(model, scored, tok.pad_token_id, batch, acc.autocast, True, padding_free)
    return mine


def negative_records(pairs: list[Pair], chunk: list, tokenizer) -> list[dict]:
    records = []
    for p in pairs:
        example = chunk[p.index]
        records.append(
            {
                "prompt": example.prompt,
                "history": [list(turn) for turn in example.history],
                "demonstration": example.response,
                "negative": tokenizer.decode(p.rejected_ids, skip_special_tokens=True),
                "ref_logp_demonstration": p.ref_chosen,
                "ref_logp_negative": p.ref_rejected,
                "negative_tokens": len(p.rejected_ids),
                "negative_finished": bool(p.rejected_ids)
                and p.rejected_ids[-1] == tokenizer.eos_token_id,
            }
        )
    return records


def negative_stats(pairs: list[Pair]) -> dict:
    """Mean negative length, and the share of negatives identical to their demonstration (such
    a pair gives no gradient: u ≡ 0)."""
    n = len(pairs)
    return {
        "negative_tokens_mean": sum(len(p.rejected_ids) for p in pairs) / n,
        "negatives_equal_demo": sum(p.rejected_ids == p.chosen_ids for p in pairs) / n,
    }
