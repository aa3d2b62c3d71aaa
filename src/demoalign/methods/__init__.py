"""The methods, one file each, readable top to bottom: sft, irft (and SPIN = IRFT with T = 1),
rft (with its reward_model and rloo steps). Their math is in `demoalign.losses`.

Every method module provides the same things: its config class (in `demoalign.config`), a
`State` class (where a run of it is, with `state_dict()` / `load_state_dict()`: what a checkpoint
keeps), `check(config, n_examples)` (refuses data the method cannot split, before the run folder
is taken) and `run(context) -> dict` (the algorithm, given a `context.RunContext`; returns the
counts of its run_end record). `METHODS` below is the one registry of them, read by the command
line, `demoalign.train`, the sweeps (`demoalign.sweep`: the demo's arms) and the option reference
(`demoalign.docs`). It names each module rather than importing it: `demoalign --help` must not
wait for torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..config import IRFTConfig, RFTConfig, SFTConfig, SPINConfig


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    help: str
    module: str  # holds `State` and `run`

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


METHODS = {
    m.name: m
    for m in (
        Method("sft", SFTConfig, "Supervised fine-tuning (token-level NLL).", f"{__name__}.sft"),
        Method("spin", SPINConfig, "SPIN: IRFT with one stage per iteration.", f"{__name__}.irft"),
        Method(
            "irft",
            IRFTConfig,
            "IRFT: implicit-reward fine-tuning with T stages.",
            f"{__name__}.irft",
        ),
        Method(
            "rft",
            RFTConfig,
            "RFT: an explicit reward model from demonstrations, and RLOO of the policy against it.",
            f"{__name__}.rft",
        ),
    )
}


def method_of(config) -> Method:
    """The registered method a config runs (by its `method` name)."""
    try:
        return METHODS[config.method]
    except KeyError:
        raise TypeError(f"no method for {type(config).__name__}") from None


__all__ = ["METHODS", "Method", "method_of"]
