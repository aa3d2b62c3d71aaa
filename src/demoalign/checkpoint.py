"""Checkpoints and resume: `OUT/checkpoints/<step>/`, written atomically, the last
`keep_checkpoints` kept, and `resume=true` continuing from the newest complete one.

A checkpoint holds, for every trainer of the run (the policy; RFT's reward model too), the
weights, the optimiser and schedule state, its step count and its position inside `fit` (epoch
and step within the epoch) (`<name>.pt`), the RNG states of every process (`rng_<rank>.pt`: torch,
CUDA, numpy, python), and `state.json`: the method's state object (where the method is: stage or
outer iteration; what it cannot recompute: IRFT's pairs of the current stage, negatives and
reference log-probs; RFT's held-out sets, running window and preference split) and the length of
metrics.jsonl at that moment, to which the log is cut back on resume. The data order itself is not
stored: `Trainer.fit` recomputes it from the seed, and the position says how far into it the run
was.

Written by hand with torch.save rather than accelerate's save_state: the run has up to two models
and its own method state, every file loads with torch.load(weights_only=True) (no pickled code),
and what is restored, in which order (the schedule must exist before its state is loaded), is
explicit here. Step name = optimiser steps of all trainers together (RFT: policy + reward).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .runio import atomic_write_text

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: a folder named by its step that holds state.json
    (written last, before the rename that makes the folder visible)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(out: str | Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def clean_leftovers(out: str | Path) -> list[str]:
    """Remove what an interrupted save left behind: `.final.tmp/`, temporary files of atomic
    writes, and half-written or half-deleted checkpoints. Returns what was removed."""
    out = Path(out)
    removed = []
    candidates = [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    root = out / CHECKPOINTS
    if root.is_dir():
        complete = set(complete_checkpoints(out))
        candidates += [p for p in root.iterdir() if p not in complete]
    for path in candidates:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(str(path.relative_to(out)))
    return removed


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Checkpoints:
    """Saves and restores the run's checkpoints: the registered trainers (`<name>.pt`), the RNG
    states, and the method's state object (`track`; anything with `state_dict()` and
    `load_state_dict()`, kept as JSON in state.json). When resuming, the tracked state is loaded
    at once, so the method knows from the start where the run was; the trainers and RNGs are
    loaded by `restore()`, which the method calls at the point of its loop where the checkpoint
    was taken (a schedule must exist before its state is loaded). Without a run folder
    (`disabled()`) saving does nothing and nothing is resumed."""

    def __init__(self, config, out, accelerator, log, resume_from: Path | None = None):
        self.config, self.out, self.accelerator, self.log = config, Path(out), accelerator, log
        self.enabled = out is not None
        self.trainers: dict = {}
        self.state = None
        self._resume_from = resume_from
        self._record = json.loads((resume_from / STATE_FILE).read_text()) if resume_from else None
        # The step last saved, known alike to every process: whether to skip a save is never
        # read from the filesystem, where another machine may not see a rename yet.
        self._saved_step = self._record["step"] if self._record else None

    @classmethod
    def disabled(cls) -> Checkpoints:
        ckpt = cls.__new__(cls)
        ckpt.enabled, ckpt.trainers, ckpt.state, ckpt._record = False, {}, None, None
        return ckpt

    @property
    def resuming(self) -> bool:
        """Whether a checkpoint waits to be restored into the trainers."""
        return self.enabled and self._record is not None

    def _sharded(self) -> bool:
        return any(getattr(t, "sharded", False) for t in self.trainers.values())

    def register(self, name: str, trainer) -> None:
        """A trainer whose weights, optimiser, schedule and position the checkpoints hold."""
        self.trainers[name] = trainer

    def track(self, state) -> None:
        """The method's state object; loaded now from the checkpoint being resumed."""
        self.state = state
        if self.resuming:
            state.load_state_dict(self._record["method"])

    def total_steps(self) -> int:
        return sum(t.global_step for t in self.trainers.values())

    def after_step(self, epoch_end: bool) -> None:
        """`FitPlan.after_step`: a checkpoint every `save_steps` optimiser steps."""
        every = self.config.save_steps if self.enabled else 0
        if every and self.total_steps() % every == 0:
            self.save()

    def after_step_or_epoch(self, epoch_end: bool) -> None:
        """`FitPlan.after_step` where every epoch end is a boundary too (SFT)."""
        if epoch_end:
            self.save()
        else:
            self.after_step(epoch_end)

    def save(self) -> None:
        """Write checkpoints/<step>/ through a temporary folder and a rename; then drop the
        oldest beyond `keep_checkpoints`. A checkpoint of this step that exists is kept."""
        if not self.enabled:
            return
        acc, step = self.accelerator, self.total_steps()
        root = self.out / CHECKPOINTS
        final, tmp = root / str(step), root / f".{step}.tmp"
        if step == self._saved_step:  # e.g. a step boundary that is also a stage boundary
            return
        self._saved_step = step
        # Every process takes part: a sharded trainer gathers its state (a collective).
        states = {name: trainer.checkpoint_state() for name, trainer in self.trainers.items()}
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, state in states.items():
                torch.save(state, tmp / f"{name}.pt")
        del states
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            record = {
                "step": step,
                "processes": acc.num_processes,
                "sharded": self._sharded(),
                "metrics_bytes": self.log.size(),
                "method": self.state.state_dict() if self.state is not None else {},
            }
            write_state(tmp / STATE_FILE, record)
            os.replace(tmp, final)
            self._drop_old(root)
        acc.wait_for_everyone()

    def _drop_old(self, root: Path) -> None:
        for old in complete_checkpoints(self.out)[: -self.config.keep_checkpoints]:
            doomed = root / f".{old.name}.del"
            os.replace(old, doomed)  # invisible first: a kill mid-delete leaves no half folder
            shutil.rmtree(doomed)

    def restore(self) -> bool:
        """Load the checkpoint being resumed into the registered trainers and this process's
        RNGs; False when there is nothing to resume."""
        if not self.resuming:
            return False
        folder, state = self._resume_from, self._record
        acc = self.accelerator
        if state["processes"] != acc.num_processes:
            raise ValueError(
                f"{folder} was written by {state['processes']} processes; resume with as many "
                f"(this run has {acc.num_processes})"
            )
        if state.get("sharded", False) != self._sharded():
            written = "sharded (FSDP2)" if state.get("sharded") else "unsharded (one process, DDP)"
            raise ValueError(
                f"{folder} was written by {written} training, whose checkpoints key the state "
                "differently: resume under the same kind of engine"
            )
        for name, trainer in self.trainers.items():
            # Sharded, every process of a machine reads the full state: memory-mapped, they share
            # the page cache instead of holding one copy each (each then keeps its own shard).
            path, mmap = folder / f"{name}.pt", getattr(trainer, "sharded", False)
            trainer.load_checkpoint_state(
                torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            )
        rng = torch.load(folder / f"rng_{acc.process_index}.pt", weights_only=True)
        _set_rng_state(rng)
        self._record = None
        return True


def write_state(path: Path, record: dict) -> None:
    """state.json: Python's float repr round-trips, so log-probs come back bit for bit."""
    atomic_write_text(path, json.dumps(record) + "\n")
