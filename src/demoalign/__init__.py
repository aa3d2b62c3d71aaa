"""demoalign: reward learning from demonstrations (IRFT, SPIN, SFT, RFT).

The names below are loaded when first used: `import demoalign` (and so `demoalign --help`) must
not wait for torch, transformers and accelerate."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalConfig": "config",
    "IRFTConfig": "config",
    "RFTConfig": "config",
    "SFTConfig": "config",
    "SPINConfig": "config",
    "TrainConfig": "config",
    "evaluate": "eval",
    "train": "run",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'demoalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
