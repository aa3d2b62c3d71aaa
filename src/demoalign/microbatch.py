"""Micro-batches cut by tokens (`micro_batch_size`): a process's share of a global batch split
into consecutive micro-batches of at most a token budget, instead of `batch_size` items each.
The global batch, its order and the loss's normaliser are unchanged (the trainer divides by the
units of the whole global batch), so the optimiser step is the same sum of the same per-item
gradients, accumulated in other groups (equal up to float rounding)."""

from __future__ import annotations

import torch

from .encoding import Tokenized
from .pairs import Pair

# Activation bytes per token and layer kept for the backward in bf16, without and with activation
# checkpointing (about 34·hidden without recomputation, Korthikanti et al. 2022, attention by
# sdpa/flash so no sequence² term; the layer's input alone with checkpointing).
BYTES_PER_TOKEN_LAYER = {False: 34, True: 2}


def item_rows(item) -> list[int] | None:
    """The lengths of the sequences a training item puts through the forward: a pair's two, one
    example's one; None for items split by count (RLOO groups)."""
    if isinstance(item, Pair):
        prompt = len(item.prompt_ids)
        return [prompt + len(item.chosen_ids), prompt + len(item.rejected_ids)]
    if isinstance(item, Tokenized):
        return [len(item.prompt_ids) + len(item.response_ids)]
    return None


def micro_batch_cost(rows: list[int], padding_free: bool) -> int:
    """Tokens a forward over these sequences computes: their sum packed, rows × longest padded."""
    return sum(rows) if padding_free else len(rows) * max(rows, default=0)


def split_by_tokens(items: list, budget: int, padding_free: bool) -> list[list] | None:
    """Consecutive micro-batches of at most `budget` tokens (one item alone may exceed it); None
    where an item has no token count."""
    sizes = [item_rows(item) for item in items]
    if any(rows is None for rows in sizes):
        return None
    batches: list[list] = []
    current: list = []
    current_rows: list[int] = []
    for item, rows in zip(items, sizes):
        if current and micro_batch_cost(current_rows + rows, padding_free) > budget:
            batches.append(current)
            current, current_rows = [], []
        current.append(item)
        current_rows += rows
    return batches + [current] if current else batches


def micro_batch_tokens(
    setting: str, model, device: torch.device, checkpointing: bool
) -> int | None:
    """The token budget of a micro-batch, or None for `batch_size` items (`fixed`, and `auto`
    off CUDA)."""
    if setting == "fixed":
        return None
    if setting == "auto":
        return auto_token_budget(model, device, checkpointing)
    return int(setting)  # a token budget, checked by the config


def auto_token_budget(model, device: torch.device, checkpointing: bool) -> int | None:
    """The token budget `auto` gives on CUDA: 80% of the memory left once the weights, their
    gradients and AdamW's two fp32 moments are counted, over the activation bytes per token;
    None (items per micro-batch, `batch_size`) off CUDA. An estimate from the model's shape, made
    once per run before training."""
    if device.type != "cuda":
        return None
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    state = weights + sum(p.numel() * (p.element_size() + 8) for p in trained)  # grads, moments
    free, _ = torch.cuda.mem_get_info(device)
    per_token = cfg.num_hidden_layers * cfg.hidden_size * BYTES_PER_TOKEN_LAYER[checkpointing]
    per_token += 34 * cfg.hidden_size  # the one layer recomputed, or the head's tile
    return max(1, int(0.8 * (free - state) // per_token))
