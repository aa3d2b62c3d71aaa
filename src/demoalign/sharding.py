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


def is_shard(tensor: torch.Tensor) -> bool:
    """An FSDP2 DTensor shard or a ZeRO-3 partition (an empty placeholder outside its forward)."""
    return isinstance(tensor, DTensor) or hasattr(tensor, "ds_id")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 DTensor shards or ZeRO-3 partitions."""
    return any(is_shard(p) for p in model.parameters())


def _is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _all_gathered(model):
    """Under ZeRO-3, the context in which every parameter of `model` is whole on every process
    (all of them at once: DeepSpeed gathers per call); otherwise nothing to do."""
    if not _is_zero3(model):
        return nullcontext()
    import deepspeed  # only present (and only reached) under DeepSpeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard all-gathered (collective), anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _own_storage(tensor: torch.Tensor):
    """The storage a parameter keeps on this process (its local shard under FSDP2)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage()


def gathered_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The full state dict of `model` on every process, in new storage, floating tensors cast
    to `dtype`. Under FSDP2 tensors are gathered and cast one at a time, so at most one extra
    full-precision tensor exists beside the result; under ZeRO-3 DeepSpeed gathers them all at
    once. Tied weights come back as one tensor under both names."""
    state = {}
    seen: dict[int, torch.Tensor] = {}
    with _all_gathered(model):
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                full = _full(tensor)
                out = full.to(dtype) if dtype is not None and full.is_floating_point() else full
                # One process's "gather" of a full shard, or a cast to the same dtype, returns
                # the parameter's own storage: a copy must never share it (releasing the copy
                # would free the training weights).
                if out.untyped_storage().data_ptr() == _own_storage(tensor).data_ptr():
                    out = out.clone()
                seen[id(tensor)] = out
            state[name] = seen[id(tensor)]
    return state


def _architecture(model: torch.nn.Module) -> type:
    """The model's own transformers class: FSDP2 may have swapped in a subclass of it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def plain_model(model: torch.nn.Module, state: dict, device=None) -> torch.nn.Module:
    """A new, unsharded instance of `model`'s architecture holding `state` (no copy of it),
    in eval mode without gradients. Built by the class's constructor on the meta device: no
    random initialisation is paid, and no DeepSpeed ZeRO-3 partitioning applies (transformers'
    `from_config` would partition it under zero3_init, a collective the main process alone
    cannot make). Buffers that are not in the state dict (rotary frequencies) are computed by
    the constructor and moved to `device`."""
    from accelerate import init_empty_weights

    model = _base(model)  # a LoRA model's plain copy is its base (`state` has them merged)
    with init_empty_weights(include_buffers=False):
        copy = _architecture(model)(model.config)
    copy.load_state_dict(state, strict=True, assign=True)
    if getattr(copy.config, "tie_word_embeddings", False):
        copy.tie_weights()
    if device is not None:
        copy.to(device)
    copy.requires_grad_(False)
    return copy.eval()


def gathered_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain copy of a sharded causal LM on every process, in `dtype` (collective); a LoRA
    model's copy is its base with the adapters merged."""
    device = next(model.parameters()).device
    return plain_model(model, plain_state(model, dtype), device)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """`gathered_weights`, with a LoRA model's adapters merged into its base weights: the state
    dict of the plain model it computes (collective)."""
    state = gathered_weights(model, dtype)
    return merged_lora_state(model, state) if hasattr(model, "get_base_model") else state


def merged_lora_state(peft_model, state: dict) -> dict:
    """The base model's state dict from a LoRA model's full one: W + scaling · B A for every
    adapted linear layer. Written by hand because peft merges only in place, into the modules
    of a model, and these are shards; the scaling and layout come from the live modules."""
    from peft.tuners.lora import LoraLayer

    state = dict(state)
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        (adapter,) = module.active_adapters
        if f"{name}.lora_A.{adapter}.weight" not in state or module.use_dora.get(adapter):
            raise ValueError(f"{name}: only plain LoRA on linear layers can be merged here")
        a = state.pop(f"{name}.lora_A.{adapter}.weight")
        b = state.pop(f"{name}.lora_B.{adapter}.weight")
        weight = state.pop(f"{name}.base_layer.weight")
        delta = module.scaling[adapter] * (b.float() @ a.float())
        state[f"{name}.weight"] = weight + (delta.T if module.fan_in_fan_out else delta).to(
            weight.dtype
        )
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    prefix = "base_model.model."
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


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
        with _all_gathered(sharded):
            # A LoRA model's weights are merged first (a whole second copy, briefly); any
            # other's are gathered one tensor at a time, straight into the copy.
            sources = (
                plain_state(sharded, self.dtype).items()
                if hasattr(sharded, "get_base_model")
                else sharded.state_dict(keep_vars=True).items()
            )
            for name, source in sources:
                target = targets[name]
                if id(target) in done:
                    continue  # a tied weight: its other name was copied already
                done.add(id(target))
                if self.released and id(target) in self._nbytes:
                    target.untyped_storage().resize_(self._nbytes[id(target)])
                target.copy_(_full(source))
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
    (collective); a LoRA model's are its base's with the adapters merged. torch's distributed
    state-dict API does the gathering for FSDP2."""
    if _is_zero3(model):
        state = {k: v.cpu() for k, v in plain_state(model).items()}
        return state if _rank() == 0 else {}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_to_cpu())
    if state and hasattr(model, "get_base_model"):
        state = merged_lora_state(model, state)
    return state


def _full_to_cpu():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_training_state(model, optimizer) -> tuple[dict, dict]:
    """Weights and optimiser state of a sharded trainer as full CPU tensors on the main process,
    keyed by parameter name (torch's distributed state-dict API; collective), so that the
    checkpoint does not depend on how the model was sharded."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return (
        get_model_state_dict(model, options=_full_to_cpu()),
        get_optimizer_state_dict(model, optimizer, options=_full_to_cpu()),
    )


def load_full_training_state(model, optimizer, state: dict) -> None:
    """Every process read the full state; each keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


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
        _check_deepspeed(config, accelerator.state.deepspeed_plugin.deepspeed_config)
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
            "be sharded too); use DDP"
        )
    if config.lora_r and config.lora_keep_adapters:
        raise ValueError(
            f"lora_keep_adapters under {kind} is not supported: final/ holds the merged model; "
            "train with DDP to keep the adapters apart"
        )


def _check_deepspeed(config, ds_config: dict) -> None:
    """DeepSpeed steps its optimiser inside `accelerator.backward`, once per call, clips by its
    own setting, keeps each process's optimiser partition in its own format, and drives one
    model per accelerator: demoalign's hand-written accumulation, its full-state checkpoints and
    RFT's second trained model do not hold there."""
    if config.method == "rft":
        raise ValueError(
            "RFT does not run under DeepSpeed (accelerate drives one DeepSpeed engine, and RFT "
            "trains two models): use DDP"
        )
    if getattr(config, "park_optimizer_state", "off") == "on":
        raise ValueError(
            "park_optimizer_state=on does not work under DeepSpeed (its optimiser keeps the state "
            "in its own partitioned buffers): use auto or off, or DeepSpeed's own "
            "offload_optimizer, which keeps the state on the host for the whole run"
        )
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != float(config.max_grad_norm):
        raise ValueError(
            f"DeepSpeed clips at gradient_clipping={clipping}, but max_grad_norm is "
            f"{config.max_grad_norm}: make them equal (DeepSpeed's is the one applied)"
        )
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
