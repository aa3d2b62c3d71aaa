"""The state one RFT run shares across its outer iterations: the policy's reference, the reward
model and its trainer, the preference pairs, the held-out demonstrations, and their checkpoint."""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from accelerate.utils import gather_object

from ..checkpoint import Checkpoints
from ..data.sources import TRAIN_SEED, preference_pairs
from ..encoding import Encoder, Tokenized
from ..generation import GenerationEngine, forward_batch_size
from ..models import load_reward_model
from ..trainer import Trainer
from .reward_model import (
    HeldOutDemonstrations,
    RewardPair,
    RewardScorer,
    encode_preference_pairs,
    pair_margins,
    score_rows,
)
from .rloo import sequence_logps_of


def in_shares(accelerator, items: list, score) -> list:
    """`score(items)`, one value per item, with each process scoring a contiguous share: every
    process gets all values, in order. A collective: every process must call it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return score(items)
    share = items[len(items) * rank // world : len(items) * (rank + 1) // world]
    return [value for part in gather_object([score(share)]) for value in part]


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


@dataclass
class RFTRun:
    """What every outer iteration shares."""

    config: object
    trainer: Trainer
    reward_trainer: Trainer
    encoder: Encoder
    out_dir: Path
    reference: object  # None with LoRA: the base with adapters disabled is the reference
    preference_train: list
    preference_eval: list
    heldout: HeldOutDemonstrations
    engine: GenerationEngine  # the run's: negatives and rollouts are sampled through it
    window: deque = field(default_factory=lambda: deque(maxlen=10))
    last_generation_s: float = 0.0

    @property
    def batch(self) -> int:
        """Sequences per scoring forward."""
        return forward_batch_size(self.config.generation_batch_size)

    @property
    def scorer(self):
        return self.trainer.accelerator.unwrap_model(self.reward_trainer.model)

    # Rewards and reference log-probs of the rows given, in this process (no communication: the
    # rollouts call them on what each process sampled). They run under the training's autocast,
    # as the policy's own log-probs do in the loss: in one precision, KL = log π − log π_ref is 0
    # at the first step.
    def rewards(self, rows: list[Tokenized]) -> list[float]:
        pad = self.encoder.tokenizer.pad_token_id
        with self.trainer.accelerator.autocast():
            return score_rows(self.scorer, rows, pad, self.batch)

    def reference_logps(self, rows: list[Tokenized]) -> list[float]:
        pad, batch = self.encoder.tokenizer.pad_token_id, self.batch
        with self.trainer.accelerator.autocast():
            if self.reference is None:
                with self.trainer.unwrapped.disable_adapter():
                    return sequence_logps_of(self.trainer.unwrapped, rows, pad, batch)
            return sequence_logps_of(self.reference, rows, pad, batch)

    def shared(self, items: list, score) -> list:
        """`score(items)` spread over the processes (`in_shares`)."""
        return in_shares(self.trainer.accelerator, items, score)

    def margins(self, pairs: list[RewardPair]) -> list[float]:
        """The reward model's margin on each pair, each process scoring a share."""
        pad = self.encoder.tokenizer.pad_token_id
        return self.shared(pairs, lambda mine: pair_margins(self.scorer, mine, pad, self.batch))


_REFERENCE_NOTE = {
    True: "LoRA: the reference is the base model with the adapters disabled; no copy is held",
    False: "full fine-tuning: the reference is a frozen copy of the initial policy held in "
    "inference mode (no gradients, no optimiser state)",
}


_SIZE_KEYS = ("policy_param_bytes", "reference_param_bytes", "reward_model_param_bytes")


def _log_memory(run: RFTRun) -> None:
    sizes = [_param_bytes(m) for m in (run.trainer.unwrapped, run.reference, run.scorer.lm)]
    note = _REFERENCE_NOTE[run.reference is None]
    run.trainer.log.write({"event": "memory", **dict(zip(_SIZE_KEYS, sizes)), "note": note})
    if run.trainer.accelerator.is_main_process and run.config.show_progress:
        mib = ", ".join(
            f"{k[: -len('_param_bytes')]} {b / 2**20:.1f} MiB" for k, b in zip(_SIZE_KEYS, sizes)
        )
        print(f"RFT: {note}; parameters: {mib}")


def set_up_run(
    config,
    trainer: Trainer,
    encoder: Encoder,
    out_dir: Path,
    n_examples: int,
    engine: GenerationEngine,
) -> RFTRun:
    policy = trainer.unwrapped
    lora = hasattr(policy, "disable_adapter")
    reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = load_reward_model(
        config.reward_model or config.model, same_ids_as=encoder.tokenizer, seed=config.seed
    )[0]
    reward_config = replace(config, learning_rate=config.reward_learning_rate)
    reward_trainer = Trainer(
        reward_config, reward_model, trainer.accelerator, trainer.log, wrapper=RewardScorer
    )
    pref_train, pref_eval = [], []
    if config.preference_data:
        raw = preference_pairs(config.preference_data, None, TRAIN_SEED, task_count=1000)
        pref_train, pref_eval = encode_preference_pairs(raw, encoder, config)
    heldout = HeldOutDemonstrations(n_examples, config.heldout_fraction, config.seed)
    parts = (config, trainer, reward_trainer, encoder, out_dir, reference, pref_train, pref_eval)
    run = RFTRun(*parts, heldout, engine)
    _log_memory(run)
    reward_trainer.start_schedule(config.outer_iterations * config.reward_steps)
    trainer.start_schedule(config.outer_iterations * config.policy_steps)
    return run


def checkpoint_run_state(run: RFTRun, ckpt: Checkpoints, totals: dict) -> tuple[list[int], dict]:
    """Register the reward model and the outer-iteration state with the checkpoints; restore
    them when resuming. Returns ([iterations done], totals), the list shared with the state."""
    ckpt.register("reward_model", run.reward_trainer)
    done = [0]
    ckpt.state_fn = lambda: {
        "iteration": done[0],
        "totals": totals,
        "heldout_ids": sorted(run.heldout.ids),
        "heldout_trained": sorted(run.heldout.trained),
        "window": [list(w) for w in run.window],
        "preference_train": [asdict(p) for p in run.preference_train],
        "preference_eval": [asdict(p) for p in run.preference_eval],
    }
    state = ckpt.restore()
    if state is None:
        return done, totals
    done[0] = state["iteration"]
    totals.update(state["totals"])
    run.heldout.ids, run.heldout.trained = set(state["heldout_ids"]), set(state["heldout_trained"])
    run.window.extend(tuple(w) for w in state["window"])
    run.preference_train = [RewardPair(**p) for p in state["preference_train"]]
    run.preference_eval = [RewardPair(**p) for p in state["preference_eval"]]
    return done, totals
