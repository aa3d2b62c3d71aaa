"""`batch_size=auto`: the largest generation batch that fits in the free GPU memory."""

from __future__ import annotations

import torch

from .sampling import DEFAULT_BATCH_SIZE

MAX_AUTO_BATCH = 512  # past this a decode step is compute-bound: bigger batches gain nothing


def auto_batch_size(model, n_prompts: int, prompt_width: int, max_new_tokens: int) -> int:
    """The largest batch whose KV cache, logits and prefill activations fit in 85% of the free
    GPU memory (torch's cached-but-unused blocks count as free); 16 off CUDA."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return min(DEFAULT_BATCH_SIZE, max(1, n_prompts))
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    elem = param.element_size()
    cache_len = prompt_width + max_new_tokens
    per_row = 2 * cfg.num_hidden_layers * kv_heads * head_dim * cache_len * elem
    per_row += 8 * cfg.vocab_size * 4  # fp32 logits of a step, softmax/warper copies, log-softmax
    intermediate = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    per_row += prompt_width * (6 * cfg.hidden_size + 3 * intermediate) * elem  # prefill activations
    free, _ = torch.cuda.mem_get_info(param.device)
    free += torch.cuda.memory_reserved(param.device) - torch.cuda.memory_allocated(param.device)
    fits = int(0.85 * free // per_row)
    size = max(1, min(fits, n_prompts, MAX_AUTO_BATCH))
    return size - size % 8 if size > 8 else size


def agreed_auto_size(target, n_prompts: int, width: int, max_new_tokens: int, shared: bool) -> int:
    """`auto_batch_size`; when processes split the prompts (`shared`: every one of them is here)
    the smallest over them, since batches are dealt out by index, so every process must cut the
    prompts into the same batches (each one's free memory differs)."""
    size = auto_batch_size(target, n_prompts, width, max_new_tokens)
    dist = torch.distributed
    if shared and dist.is_available() and dist.is_initialized():
        device = next(target.parameters()).device
        agreed = torch.tensor([size], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        size = int(agreed.item())
    return size
