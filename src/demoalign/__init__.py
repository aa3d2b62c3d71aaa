"""demoalign: reward learning from demonstrations (IRFT, SPIN, SFT; RFT to come)."""

from .config import IRFTConfig, SFTConfig, SPINConfig, TrainConfig
from .run import train

__all__ = ["IRFTConfig", "SFTConfig", "SPINConfig", "TrainConfig", "train"]
__version__ = "0.1.0"
