"""The static-cache state of one model: its half-precision copy (on CUDA), the compiled decode
step transformers keeps on that copy, the `auto` batch size and the graph batch shapes."""

from __future__ import annotations

import copy
import os
import sys

import torch

_COMPILE_STATE = ("_compiled_call", "_last_compile_config", "_previous_max_cache_length")


def half_copy(model, dtype: torch.dtype):
    """A copy of `model` whose parameters are `dtype` and never need grad. Built by deepcopy with
    the parameters pre-mapped, so no full-precision copy ever exists; tied weights stay tied and
    buffers (rotary frequencies) keep their precision."""
    memo = {
        id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for p in model.parameters()
    }
    clone = copy.deepcopy(model, memo)
    for attr in _COMPILE_STATE:
        clone.__dict__.pop(attr, None)
    return clone.eval()


def wants_half_copy(model) -> bool:
    """Where a bf16 copy pays: fp32 weights on CUDA (a peft model generates as it is)."""
    param = next(model.parameters())
    peft = hasattr(model, "get_base_model")
    return param.device.type == "cuda" and param.dtype == torch.float32 and not peft


def architecture(model) -> tuple:
    """What must be equal for a copy (and its compiled graph) made for one model to serve
    another: class, device, configuration (not where it was loaded from), generation defaults and
    every parameter's name, shape and dtype."""
    generation = getattr(model, "generation_config", None)
    where_from = ("_name_or_path", "_commit_hash", "transformers_version")
    config = {k: v for k, v in model.config.to_dict().items() if k not in where_from}
    return (
        type(model),
        next(model.parameters()).device,
        repr(sorted(config.items())),
        repr(sorted(generation.to_dict().items())) if generation is not None else "",
        tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()),
    )


class StaticEngine:
    """Per model (`source`): the model generation runs on (a half-precision copy on CUDA when the
    weights are fp32, else the model itself), the batch size chosen once, and whether compilation
    works here. The copy's tensors are kept across calls, their storage is not. A
    `GenerationEngine` creates, hands over (`adopt`) and closes these."""

    def __init__(self, model, half: bool):
        """half: generate on a bf16 copy (fp16 on a GPU without bf16)."""
        self.source = model
        self.architecture = architecture(model)
        device = next(model.parameters()).device
        self.half = half
        old_gpu = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        dtype = torch.float16 if old_gpu else torch.bfloat16
        self.model = half_copy(model, dtype) if self.half else None
        self._bytes = (
            [p.untyped_storage().nbytes() for p in self.model.parameters()] if self.half else []
        )
        self.released = False
        self.auto_size: int | None = None  # `auto` is measured once per model, at its first call
        self.graph_sizes: set[int] = set()
        mode = os.environ.get("DEMOALIGN_COMPILE_MODE", "reduce-overhead")
        self.compile = device.type == "cuda" and mode != "off"
        self.compile_config = None
        if self.compile:
            from transformers import CompileConfig

            self.compile_config = CompileConfig(mode=mode)

    def target(self):
        return self.model if self.half else self.source

    @torch.no_grad()
    def refresh(self) -> None:
        """Call start: the copy takes the source's current weights, in the same tensors."""
        if not self.half:
            return
        for dst, src, nbytes in zip(self.model.parameters(), self.source.parameters(), self._bytes):
            if self.released:
                dst.untyped_storage().resize_(nbytes)
            dst.copy_(src.detach())
        self.released = False

    def release(self) -> None:
        """Frees the copy's weights (the tensor objects, and so the compiled graph, stay)."""
        if not self.half or self.released:
            return
        for p in self.model.parameters():
            p.untyped_storage().resize_(0)
        self.released = True

    def graph_batch(self, size: int, margin: bool) -> int:
        """The batch shape to pad `size` rows to. Each shape is a compile, and the per-stage prompt
        counts of a run differ by one: a shape that holds all of a call's prompts (`margin`) gets
        room for a few more, and close sizes share a shape."""
        for shape in sorted(self.graph_sizes):
            if size <= shape <= size * 1.25 + 16:
                return shape
        shape = -(-size // 16) * 16 + 16 if margin and size > 8 else size
        self.graph_sizes.add(shape)
        return shape

    def disable_compile(self, error: Exception) -> None:
        first_line = str(error).splitlines()[0] if str(error) else ""
        print(
            "demoalign: torch.compile of the static-cache decode step failed "
            f"({type(error).__name__}: {first_line}); generating with the static cache "
            "uncompiled from now on",
            file=sys.stderr,
            flush=True,
        )
        self.compile = False
        self.compile_config = None

    def adopt(self, model) -> None:
        """Serve `model` (of this engine's architecture) from now on: its weights are copied in
        at the next refresh, into the same tensors, so the compiled decode step stays valid."""
        self.source = model
        self.auto_size = None  # the new model's prompts, lengths and memory may differ
        if self.model is not None:
            # transformers never makes a static cache shorter than the copy's last one: the new
            # model's would be sized by the old one's lengths, not by what `auto` measures.
            self.model.__dict__.pop("_previous_max_cache_length", None)

    def let_go(self) -> None:
        """The source is done: release the copy and keep no reference to the source."""
        self.release()
        self.source = None

    def close(self) -> None:
        """Drop the copy and its compiled decode step (and on a model generating as it is, the
        compiled step transformers left on it)."""
        self.release()
        for model in (self.model, self.source):
            if model is not None:
                for attr in _COMPILE_STATE:
                    model.__dict__.pop(attr, None)
        self.model = self.source = None
