"""Sequence log-probabilities: the SUM of response-token log-probs (SPEC.md §1).

Prompt and padding positions carry label -100 and contribute nothing; the response's closing
EOS carries its own id as label and counts.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor, rows_per_chunk: int = 4) -> torch.Tensor:
    """Log-prob of each next-token label, 0 where the label is IGNORE_INDEX.

    logits: [B, L, V] predicting position t+1 from t; labels: [B, L] aligned with the input ids.
    Hand-written rather than `log_softmax(...).gather(...)` because that materialises a float32
    [B, L, V] tensor; here the float32 log-sum-exp is computed a few rows at a time.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    out = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float()
        picked = chunk.gather(-1, safe_targets[start : start + rows_per_chunk].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    result = torch.cat(out, dim=0)
    return result * mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob per row, number of scored tokens per row)."""
    per_token = token_logps(logits, labels)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    return per_token.sum(-1), n_tokens


def model_sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `model` over a padded batch (input_ids, attention_mask, labels)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])
