"""demoalign: reward learning from demonstrations (IRFT, SPIN, SFT, RFT)."""

from .config import EvalConfig, IRFTConfig, RFTConfig, SFTConfig, SPINConfig, TrainConfig
from .eval import evaluate
from .run import train

__all__ = [
    "EvalConfig",
    "IRFTConfig",
    "RFTConfig",
    "SFTConfig",
    "SPINConfig",
    "TrainConfig",
    "evaluate",
    "train",
]
__version__ = "0.1.0"
