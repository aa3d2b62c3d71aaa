"""The optimiser's state parked in host memory while the model only generates.

Adam keeps two moment tensors per parameter: for fp32 weights that is twice the weights' memory
(10.6 GiB at 1.4B parameters). They are idle from the last optimiser step of one stage to the
first of the next, which is exactly when that stage's negatives and reference log-probs are
computed. Parking them on the host for that time hands their GPU memory to generation's KV
cache, so generation's peak stays below training's (whose peak includes them anyway) without a
smaller generation batch.

The state tensors stay the same objects: their storage is copied to pinned host memory and
emptied, then refilled in place. The optimiser, a fused kernel's cached pointers to the tensor
objects, or anything else holding them sees no difference once they are back. Written by hand:
torch has no such call, and accelerate's and DeepSpeed's CPU offload keep the state on the host
for the whole run and take the optimiser step there (slower every step, not just while idle).
"""

from __future__ import annotations

import sys
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


def _state_tensors(optimizer, device_type: str):
    """The optimiser's non-scalar state tensors on `device_type` (the local shard of an FSDP2
    DTensor), in the order of its parameter groups. Scalars (Adam's `step`) stay put, and so
    does state already on the host (FSDP2's CPU offload)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for value in optimizer.state.get(param, {}).values():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                local = value.to_local() if isinstance(value, DTensor) else value
                if local.untyped_storage().device.type == device_type:
                    yield local


def _state_storages(optimizer, device_type: str) -> list[torch.UntypedStorage]:
    """Every distinct non-empty storage of `_state_tensors`."""
    seen: set[int] = set()
    storages = []
    for tensor in _state_tensors(optimizer, device_type):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            storages.append(storage)
    return storages


def _own_resizable_storages(optimizer, device_type: str) -> None:
    """State loaded from a checkpoint may still view the loaded file's storage (torch.load's
    own, or a memory map), which cannot be emptied: each such tensor is moved, in place (the
    same tensor object), to a fresh copy of its storage; tensors that shared one share its
    copy."""
    copies: dict[int, torch.UntypedStorage] = {}
    with torch.no_grad():
        for tensor in _state_tensors(optimizer, device_type):
            storage = tensor.untyped_storage()
            if storage.resizable() or not storage.nbytes():
                continue
            if storage.data_ptr() not in copies:
                copies[storage.data_ptr()] = storage.clone()
            copy = copies[storage.data_ptr()]
            tensor.set_(copy, tensor.storage_offset(), tensor.size(), tensor.stride())


# Host memory comes in chunks of a power of two bytes: torch's pinned-memory allocator rounds
# every request up to one, so a buffer per state tensor would waste up to half of each.
CHUNK_BYTES = 1 << 26  # 64 MiB


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (valid until the storage is resized)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _HostSpace:
    """Host bytes addressed from 0, in chunks kept for the run (pinned allocation is slow);
    pinned where the state is on a GPU, ordinary memory if pinning fails."""

    def __init__(self, pin: bool):
        self.chunks: list[torch.Tensor] = []
        self.pin = pin

    def reserve(self, nbytes: int) -> None:
        while len(self.chunks) * CHUNK_BYTES < nbytes:
            self.chunks.append(self._chunk())

    def _chunk(self) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as error:
                self.pin = False
                print(
                    f"demoalign: pinned host memory for the parked optimiser state failed "
                    f"({str(error).splitlines()[0]}); using ordinary memory (slower copies)",
                    file=sys.stderr,
                    flush=True,
                )
        return torch.empty(CHUNK_BYTES, dtype=torch.uint8)

    def pieces(self, offset: int, nbytes: int):
        """(host slice, start, end) covering host bytes [offset, offset + nbytes), where start
        and end count from `offset`."""
        done = 0
        while done < nbytes:
            chunk, inside = divmod(offset + done, CHUNK_BYTES)
            length = min(nbytes - done, CHUNK_BYTES - inside)
            yield self.chunks[chunk][inside : inside + length], done, done + length
            done += length


class OptimizerParking:
    """Parks one optimiser's state (what of it lives on the training device) on the host and
    brings it back."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device_type = torch.device(device).type
        self._host = _HostSpace(pin=self.device_type == "cuda")
        self._parked: list[tuple[torch.UntypedStorage, int, int]] = []  # storage, offset, bytes
        self.bytes = 0  # moved at the last park
        self.seconds = 0.0  # the last park and unpark together

    @property
    def parked(self) -> bool:
        return bool(self._parked)

    @property
    def host_bytes(self) -> int:
        """Host memory held for the run."""
        return len(self._host.chunks) * CHUNK_BYTES

    def park(self, optimizer) -> None:
        """Copy every state storage to the host, then empty it. No-op when there is no state yet
        (before the first step, or after a reset)."""
        if self._parked:
            raise RuntimeError("the optimiser state is parked already: unpark it first")
        started = time.perf_counter()
        _own_resizable_storages(optimizer, self.device_type)
        storages = _state_storages(optimizer, self.device_type)
        parked, offset = [], 0
        for storage in storages:
            parked.append((storage, offset, storage.nbytes()))
            offset += storage.nbytes()
        self._host.reserve(offset)
        for storage, start, nbytes in parked:
            device_bytes = _bytes_of(storage)
            for host, a, b in self._host.pieces(start, nbytes):
                host.copy_(device_bytes[a:b], non_blocking=True)
        if storages and self.device_type == "cuda":
            torch.cuda.synchronize()  # the copies read the storages about to be emptied
        for storage in storages:
            storage.resize_(0)
        self._parked = parked
        self.bytes = offset
        self.seconds = time.perf_counter() - started

    def unpark(self) -> None:
        """Refill the parked storages in place."""
        started = time.perf_counter()
        for storage, start, nbytes in self._parked:
            storage.resize_(nbytes)
            device_bytes = _bytes_of(storage)
            for host, a, b in self._host.pieces(start, nbytes):
                device_bytes[a:b].copy_(host, non_blocking=True)
        if self._parked and self.device_type == "cuda":
            torch.cuda.synchronize()  # so that `seconds` is the transfer's time, not its launch's
        self._parked = []
        self.seconds += time.perf_counter() - started
