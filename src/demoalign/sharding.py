"""Sharded training (FSDP2, DeepSpeed ZeRO-3): the places where a model's parameters are shards.

Under FSDP2 every parameter is a DTensor holding this process's slice, and the full weights
exist only inside a forward of the prepared (root) module; under ZeRO-3 a parameter outside its
module's forward is an empty placeholder. Training itself needs nothing from here: the policy's
forward is the prepared SequenceScorer's, whose root unit gathers the LM head it reads. What does
need the full weights is everything else done with the model:

- generation and the reference log-probs of a stage start run on a plain, unsharded copy
  gathered from every process (`gathered_copy`). A sharded model cannot generate: every decode
  step would be a collective, and processes finish their rows after different numbers of steps;
- `final/` and checkpoints hold full tensors (`full_state_dict`), so that a folder written by 8
  sharded processes loads into one plain model, or resumes on the same number of processes.

Every function here that gathers is collective: every process must call it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 DTensor shards or ZeRO-3 partitions."""
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _zero3_gathered(model):
    """ZeRO-3's context that materialises every parameter of `model` on every process."""
    import deepspeed  # only present (and only reached) under DeepSpeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def gathered_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The full state dict of `model` on every process, floating tensors cast to `dtype`.
    Parameters are gathered and cast one at a time, so at most one extra full-precision tensor
    exists beside the result. Tied weights come back as one tensor under both names."""
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    state = {}
    seen: dict[int, torch.Tensor] = {}
    with _zero3_gathered(model) if zero3 else nullcontext():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
                cast = dtype is not None and full.is_floating_point()
                out = full.to(dtype) if cast else full
                if not isinstance(tensor, DTensor) and out.data_ptr() == tensor.data_ptr():
                    out = out.clone()  # never the model's own storage: a copy must be a copy
                seen[id(tensor)] = out
            state[name] = seen[id(tensor)]
    return state


def plain_model(model: torch.nn.Module, state: dict, device=None) -> torch.nn.Module:
    """A new, unsharded instance of `model`'s architecture holding `state` (no copy of it),
    in eval mode without gradients. Built from the config on the meta device, so no random
    initialisation is paid; buffers that are not in the state dict (rotary frequencies) are
    computed by the constructor and moved to `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        copy = AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(state, strict=True, assign=True)
    if getattr(copy.config, "tie_word_embeddings", False):
        copy.tie_weights()
    if device is not None:
        copy.to(device)
    copy.requires_grad_(False)
    return copy.eval()


def gathered_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain copy of a sharded causal LM on every process, in `dtype` (collective)."""
    device = next(model.parameters()).device
    return plain_model(model, gathered_weights(model, dtype), device)


class GatheredCopy:
    """The plain copy generation and reference log-probs use under sharding, kept for the whole
    run: built at the first stage start, then refreshed in place from the sharded weights (the
    same tensors, so a compiled decode graph stays valid: compilation is paid once per run), and
    its weights' storage released in between, so training never holds it."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.model: torch.nn.Module | None = None
        self._nbytes: dict[int, int] = {}
        self.released = False

    @torch.no_grad()
    def materialise(self, sharded: torch.nn.Module) -> torch.nn.Module:
        """The copy holding `sharded`'s current weights (collective)."""
        if self.model is None:
            self.model = gathered_copy(sharded, self.dtype)
            self._nbytes = {id(p): p.untyped_storage().nbytes() for p in self.model.parameters()}
            return self.model
        targets = self.model.state_dict(keep_vars=True)
        done: set[int] = set()
        zero3 = any(hasattr(p, "ds_id") for p in sharded.parameters())
        with _zero3_gathered(sharded) if zero3 else nullcontext():
            for name, source in sharded.state_dict(keep_vars=True).items():
                target = targets[name]
                if id(target) in done:
                    continue  # a tied weight: its other name was copied already
                done.add(id(target))
                if self.released and id(target) in self._nbytes:
                    target.untyped_storage().resize_(self._nbytes[id(target)])
                full = source.full_tensor() if isinstance(source, DTensor) else source
                target.copy_(full.detach())
        self.released = False
        return self.model

    def release(self) -> None:
        """Free the copy's weights; the tensor objects (and a graph compiled on them) stay."""
        if self.model is None or self.released:
            return
        for p in self.model.parameters():
            p.untyped_storage().resize_(0)
        self.released = True


def full_state_dict(model: torch.nn.Module) -> dict:
    """Full CPU tensors of a sharded model on the main process, an empty dict elsewhere
    (collective). torch's distributed state-dict API does the gathering for FSDP2."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        state = gathered_weights(model)
        return {k: v.cpu() for k, v in state.items()} if _rank() == 0 else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sharding_of(accelerator) -> str | None:
    """ "FSDP2", "ZeRO-3" or None (DDP, ZeRO-1/2 and one process keep whole parameters)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        return "FSDP2" if version == 2 else "FSDP1"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return "ZeRO-3" if stage == 3 else None
    return None


def check_distributed_setup(config, accelerator) -> None:
    """Refuse, before anything is written, what does not run under this engine (yet)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _check_deepspeed(config)
    kind = sharding_of(accelerator)
    if kind is None:
        return
    if kind == "FSDP1":
        raise ValueError(
            "FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config "
            "(recipes/accelerate/fsdp2.yaml)"
        )
    if config.method == "rft":
        raise ValueError(
            f"RFT does not run under {kind} yet (its reward model and frozen reference would "
            "be sharded too); use DDP or ZeRO-2"
        )
    if config.lora_r:
        raise ValueError(
            f"LoRA under {kind} is not supported: the adapters are small, so DDP or ZeRO-2 "
            "with LoRA holds the base model once per GPU in bf16 without sharding"
        )


def _check_deepspeed(config) -> None:
    """DeepSpeed steps its optimiser inside `accelerator.backward`, once per call, and keeps
    each process's optimiser partition in its own format: demoalign's hand-written accumulation
    and its full-state checkpoints do not hold there."""
    if config.gradient_accumulation_steps != 1:
        raise ValueError(
            "under DeepSpeed gradient_accumulation_steps must be 1 (DeepSpeed would step at "
            "every micro-batch): raise batch_size or the number of processes, or use FSDP2"
        )
    if config.keep_checkpoints:
        raise ValueError(
            "checkpoints are not supported under DeepSpeed (its optimiser state is partitioned "
            "per process): set keep_checkpoints=0, or use FSDP2 or DDP to resume runs"
        )
