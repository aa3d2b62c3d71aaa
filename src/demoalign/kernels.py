"""Fused kernels from liger-kernel (the optional extra `demoalign[kernels]`), for training on a
CUDA GPU: its Triton RMSNorm, rotary embedding and SwiGLU replace the model's own modules'
forwards in place (`_apply_liger_kernel_to_instance`, liger's own entry for a model already
built). Not its cross-entropy kernels: demoalign's losses need per-sequence log-probs, which its
own tiled LM head computes (logprobs.SequenceScorer) without a [tokens x vocabulary] tensor.
liger patches the model types it knows (Llama, Mistral, Qwen, Gemma, …); others stay as they are."""

from __future__ import annotations

import importlib.util

import torch


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(setting: str, device: torch.device) -> bool:
    """kernels=auto|liger|none: auto is liger where it can run (CUDA, the package installed);
    liger where it cannot is an error, never a silent fallback."""
    if setting == "none":
        return False
    can_run = device.type == "cuda" and liger_installed()
    if setting == "auto" or can_run:
        return can_run
    if device.type != "cuda":
        raise ValueError(
            "kernels=liger needs a CUDA GPU (liger-kernel's kernels are Triton kernels); on the "
            "CPU use kernels=auto or kernels=none"
        )
    raise ValueError("kernels=liger needs liger-kernel: pip install 'demoalign[kernels]'")


def apply_liger(model: torch.nn.Module) -> str:
    """Patch liger's kernels into `model` (its base model under peft); returns the model type."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(
        model=base,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return base.config.model_type
