"""Cutting a call's prompts into batches and its outputs back into responses."""

from __future__ import annotations

import torch


def length_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by length (less padding), cut into batches of `batch_size`."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(
    batch: list[list[int]], pad_id: int, device, width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `batch` padded on the left to one width."""
    width = max(width, max(len(ids) for ids in batch))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def strip_after_eos(ids: list[int], eos_id: int) -> list[int]:
    """Generated ids up to and including the first EOS. transformers pads only rows that have
    finished (after their EOS): in a row without EOS every id was sampled, pad ids included, and
    is kept."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def check_one_each(indices: list[int], n: int, what: str) -> None:
    """After processes gathered their shares: exactly one sample per prompt, or the processes
    disagreed on the batches (the pairs would silently be wrong)."""
    if indices != list(range(n)):
        raise RuntimeError(
            f"the processes' {what} do not cover the {n} prompts once each "
            f"({len(indices)} gathered): the processes cut the prompts into different batches"
        )
