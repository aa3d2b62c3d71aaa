"""Generation backend `hf`: batched, left-padded, sampled (temperature 1, top-p 1 by default).

Prompts are grouped into batches by length (less padding), each batch is generated with a seed
derived from (seed, batch index), and batches are dealt round-robin to processes. The negatives
therefore do not depend on how many processes share the work.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .progress import progress_bar


def sampling_config(
    tokenizer, max_new_tokens: int, temperature: float, top_p: float, greedy: bool
) -> GenerationConfig:
    """Pure sampling at `temperature` and `top_p` (top-k off), or greedy decoding."""
    common = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    if temperature <= 0:
        raise ValueError(
            "temperature must be > 0 when sampling; set greedy=true for greedy decoding"
        )
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)


def _generate_with_only(model, config: GenerationConfig, input_ids, attention):
    """transformers fills every field left unset from `model.generation_config` (a checkpoint's
    repetition_penalty, min_p, …); a blank one in its place keeps the sampling exactly `config`."""
    inner = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # peft wraps the model
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        return model.generate(
            input_ids=input_ids, attention_mask=attention, generation_config=config
        )
    finally:
        inner.generation_config = saved


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def _strip_after_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to and including the first EOS (padding after it removed)."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids


def length_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    desc: str = "generating",
    show_progress: bool = True,
) -> dict[int, list[int]]:
    """Generate one response per prompt; returns {prompt index: generated ids} for the batches
    this process owns (all of them with one process)."""
    config = sampling_config(tokenizer, max_new_tokens, temperature, top_p, greedy)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = length_batches(prompt_ids, batch_size)
    mine = [(b, idx) for b, idx in enumerate(batches) if b % num_processes == process_index]
    results: dict[int, list[int]] = {}
    with progress_bar(
        desc, total=sum(len(idx) for _, idx in mine), enabled=show_progress
    ) as advance:
        for b, idx in mine:
            input_ids, attention = _left_pad(
                [prompt_ids[i] for i in idx], tokenizer.pad_token_id, device
            )
            torch.manual_seed(seed * 1_000_003 + b)
            out = _generate_with_only(model, config, input_ids, attention)
            for row, i in enumerate(idx):
                new = out[row, input_ids.shape[1] :].tolist()
                results[i] = _strip_after_eos(new, tokenizer.eos_token_id, tokenizer.pad_token_id)
            advance(len(idx))
    model.train(was_training)
    return results
