"""Pairs of (demonstration, negative) for the pairwise loss, and their log-probs from ONE forward
over the concatenated batch [demonstrations; negatives]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoding import Tokenized, collate
from .logprobs import model_sequence_logps
from .models import eval_mode


@dataclass
class Pair:
    index: int  # position of the demonstration in the stage's chunk
    prompt_ids: list[int]
    demo_ids: list[int]
    negative_ids: list[int]
    ref_demo: float = 0.0
    ref_negative: float = 0.0
    demo_truncated: bool = False
    negative_truncated: bool = False


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    rows = [Tokenized(p.prompt_ids, p.demo_ids) for p in pairs]
    rows += [Tokenized(p.prompt_ids, p.negative_ids) for p in pairs]
    return collate(rows, pad_id)


def pair_logps(
    model, pairs: list[Pair], pad_id: int, padding_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(y|x), log π(ỹ|x), tokens of y, tokens of ỹ), one value per pair."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    logps, n_tokens = model_sequence_logps(model, batch, padding_free)
    n = len(pairs)
    return logps[:n], logps[n:], n_tokens[:n], n_tokens[n:]


@torch.no_grad()
def fill_reference_logps(
    model,
    pairs: list[Pair],
    pad_id: int,
    batch_size: int,
    autocast,
    negatives: bool = True,
    padding_free: bool = False,
) -> None:
    """Reference log-probs by the CURRENT weights (the stage-start model), in place. With
    negatives=False only the demonstrations' (the negatives' came from generation).
    `padding_free` as in training: the same forward, so u = 0 exactly at a stage's first step."""
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            with autocast():
                if negatives:
                    demo, neg, _, _ = pair_logps(model, chunk, pad_id, padding_free)
                else:
                    rows = [Tokenized(p.prompt_ids, p.demo_ids) for p in chunk]
                    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
                    demo, neg = model_sequence_logps(model, batch, padding_free)[0], None
            for n, (pair, d) in enumerate(zip(chunk, demo.tolist())):
                pair.ref_demo = d
                if neg is not None:
                    pair.ref_negative = neg[n].item()


@torch.no_grad()
def in_eval_batches(
    model, rows: list[Tokenized], pad_id: int, batch_size: int, score
) -> list[float]:
    """`score(model, batch)` over padded batches of `rows`, in eval mode, one float per row."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(rows[start : start + batch_size], pad_id).items()
            }
            out += score(model, batch).tolist()
    return out
