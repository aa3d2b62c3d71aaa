"""What `demoalign.train` hands a method's `run`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import Checkpoints
from ..encoding import Encoder
from ..generation import GenerationEngine
from ..trainer import Trainer


@dataclass
class RunContext:
    """One run's parts, built by `demoalign.train` before the method starts: the checked config,
    the trainer holding the policy, the prompt encoder, the demonstrations, the run folder, the
    checkpoints (already tracking `state`), the method's `State` (loaded from the checkpoint when
    resuming), the generation engine every sampling of the run goes through, and
    `on_stage_end(model, stage)` for evaluation over IRFT/SPIN stages."""

    config: object
    trainer: Trainer
    encoder: Encoder
    examples: list
    out_dir: Path
    checkpoints: Checkpoints
    state: object
    engine: GenerationEngine
    on_stage_end: Callable | None = None
