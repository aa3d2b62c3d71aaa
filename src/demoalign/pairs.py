"""Pairs of responses (a demonstration and a negative, or a preference pair) as token ids, and
their log-probs from ONE forward over the concatenated batch [chosen; rejected]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Preference
from .encoding import Encoder, Tokenized, collate
from .logprobs import model_sequence_logps
from .models import eval_mode


@dataclass
class Pair:
    """One pair of responses to one prompt, as token ids: `chosen` is preferred to `rejected`.
    The one pair type of every method and of the evaluation: a demonstration y and the policy's
    negative ỹ (IRFT/SPIN, RFT's reward step; kind "demo"), or a real preference pair (RFT's
    `preference_data`, weighted; kind "preference"; the eval's held-out pairs)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0  # position of the demonstration in its stage's (or iteration's) chunk
    weight: float = 1.0  # of its loss in RFT's reward step
    kind: str = "demo"
    ref_chosen: float = 0.0  # log π_ref(chosen|x), IRFT's reference
    ref_rejected: float = 0.0
    chosen_truncated: bool = False  # a response cut to max_length
    rejected_truncated: bool = False


# Pair's field names before one pair type served every method; checkpoints of then hold them.
_EARLIER_NAMES = {
    "demo_ids": "chosen_ids",
    "negative_ids": "rejected_ids",
    "ref_demo": "ref_chosen",
    "ref_negative": "ref_rejected",
    "demo_truncated": "chosen_truncated",
    "negative_truncated": "rejected_truncated",
}


def pair_from_dict(fields: dict) -> Pair:
    """A Pair from its `asdict` form in a checkpoint, also as earlier versions wrote it."""
    return Pair(**{_EARLIER_NAMES.get(key, key): value for key, value in fields.items()})


def fit_pair(encoder: Encoder, prompt_ids, chosen_ids, rejected_ids, **fields) -> Pair:
    """The pair with both responses cut to the encoder's max_length as training cuts them, and
    whether each was cut. `fields`: Pair's other fields."""
    chosen, rejected = encoder.fit(prompt_ids, chosen_ids), encoder.fit(prompt_ids, rejected_ids)
    return Pair(
        prompt_ids,
        chosen.response_ids,
        rejected.response_ids,
        chosen_truncated=len(chosen.response_ids) < len(chosen_ids),
        rejected_truncated=len(rejected.response_ids) < len(rejected_ids),
        **fields,
    )


def encode_preference(encoder: Encoder, preference: Preference, fit: bool, **fields) -> Pair:
    """A preference pair of texts as token ids; `fit` as in `fit_pair` (else uncut)."""
    prompt_ids = encoder.prompt_ids(preference.example)
    chosen_ids = encoder.response_ids(preference.example.response)
    rejected_ids = encoder.response_ids(preference.rejected)
    if fit:
        return fit_pair(encoder, prompt_ids, chosen_ids, rejected_ids, **fields)
    return Pair(prompt_ids, chosen_ids, rejected_ids, **fields)


def pair_rows(pairs: list[Pair]) -> list[Tokenized]:
    """The sequences of the pairs, every chosen one first: [chosen…; rejected…]."""
    return [Tokenized(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        Tokenized(p.prompt_ids, p.rejected_ids) for p in pairs
    ]


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    return collate(pair_rows(pairs), pad_id)


def pair_logps(
    model, pairs: list[Pair], pad_id: int, padding_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(chosen|x), log π(rejected|x), their response tokens), one value per pair."""
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
                    rows = [Tokenized(p.prompt_ids, p.chosen_ids) for p in chunk]
                    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
                    demo, neg = model_sequence_logps(model, batch, padding_free)[0], None
            for n, (pair, d) in enumerate(zip(chunk, demo.tolist())):
                pair.ref_chosen = d
                if neg is not None:
                    pair.ref_rejected = neg[n].item()


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
