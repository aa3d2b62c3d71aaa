"""The optimiser's state parked in host memory while the model only generates.

Adam keeps two moment tensors per parameter: for fp32 weights that is twice the weights' memory
(10.6 GiB at 1.4B parameters). They are idle from the last optimiser step of one stage to the
first of the next, which is exactly when that stage's negatives and reference log-probs are
computed. Parking them on the host for that time hands their GPU memory to generation's KV
cache, so generation's peak stays below training's (whose peak includes them anyway) without a
smaller generation batch.

The state tensors stay the same objects: their storage is copied to a pinned host buffer and
emptied, then refilled in place. The optimiser, a fused kernel's cached pointers to the tensor
objects, or anything else holding them sees no difference once they are back. Written by hand:
torch has no such call, and accelerate's and DeepSpeed's CPU offload keep the state on the host
for the whole run and take the optimiser step there (slower every step, not just while idle).
"""

from __future__ import annotations

import time

import torch
from torch.distributed.tensor import DTensor


def parking_enabled(choice: str, device: torch.device, deepspeed: bool) -> bool:
    """`park_optimizer_state` (validated by the config; `on` under DeepSpeed is refused by
    sharding.check_distributed_setup) resolved: auto parks on CUDA when the optimiser is torch's
    own."""
    if choice == "auto":
        return device.type == "cuda" and not deepspeed
    return choice == "on"


def _state_storages(optimizer) -> list[torch.UntypedStorage]:
    """Every distinct storage of the optimiser's non-scalar state tensors (the local shard of an
    FSDP2 DTensor), in the order of its parameter groups. Scalars (Adam's `step`) stay put."""
    seen: set[int] = set()
    storages = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            for value in optimizer.state.get(param, {}).values():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                local = value.to_local() if isinstance(value, DTensor) else value
                storage = local.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    storages.append(storage)
    return storages


class OptimizerParking:
    """Parks one optimiser's state on the host and brings it back. The host buffers are kept for
    the run (pinned allocation is slow) and reused while the state's sizes do not change."""

    def __init__(self):
        self._buffers: list[torch.Tensor] = []
        self._parked: list[tuple[torch.UntypedStorage, int]] = []
        self.bytes = 0  # moved at the last park
        self.seconds = 0.0  # the last park and unpark together

    def _buffer(self, i: int, storage: torch.UntypedStorage) -> torch.Tensor:
        nbytes = storage.nbytes()
        if i < len(self._buffers) and self._buffers[i].numel() == nbytes:
            return self._buffers[i]
        pin = storage.device.type == "cuda"
        buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin)
        if i < len(self._buffers):
            self._buffers[i] = buffer
        else:
            self._buffers.append(buffer)
        return buffer

    def park(self, optimizer) -> None:
        """Copy every state storage to the host, then empty it. No-op when there is no state yet
        (before the first step, or after a reset)."""
        started = time.perf_counter()
        storages = _state_storages(optimizer)
        for i, storage in enumerate(storages):
            self._buffer(i, storage).untyped_storage().copy_(storage, non_blocking=True)
        if any(s.device.type == "cuda" for s in storages):
            torch.cuda.synchronize()  # the copies read the storages about to be emptied
        self._parked = [(s, s.nbytes()) for s in storages]
        for storage in storages:
            storage.resize_(0)
        self.bytes = sum(n for _, n in self._parked)
        self.seconds = time.perf_counter() - started

    def unpark(self) -> None:
        """Refill the parked storages in place."""
        started = time.perf_counter()
        for i, (storage, nbytes) in enumerate(self._parked):
            storage.resize_(nbytes)
            storage.copy_(self._buffers[i].untyped_storage(), non_blocking=True)
        if any(s.device.type == "cuda" for s, _ in self._parked):
            torch.cuda.synchronize()  # so that `seconds` is the transfer's time, not its launch's
        self._parked = []
        self.seconds += time.perf_counter() - started

    @property
    def parked(self) -> bool:
        return bool(self._parked)
