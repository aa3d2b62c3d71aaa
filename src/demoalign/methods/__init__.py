"""The methods, one file each, readable top to bottom: sft, irft (and SPIN = IRFT with T = 1),
rft (with its reward_model and rloo steps). Their math is in `demoalign.losses`."""

from .irft import run_irft
from .rft import run_rft
from .sft import run_sft

__all__ = ["run_irft", "run_rft", "run_sft"]
