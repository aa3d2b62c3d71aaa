"""demoalign: reward learning from demonstrations (IRFT, SPIN, SFT, RFT)."""

from .config import IRFTConfig, RFTConfig, SFTConfig, SPINConfig, TrainConfig
from .run import train

__all__ = ["IRFTConfig", "RFTConfig", "SFTConfig", "SPINConfig", "TrainConfig", "train"]
__version__ = "0.1.0"
