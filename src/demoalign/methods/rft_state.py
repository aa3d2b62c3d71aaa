"""The state one RFT run shares across its outer iterations: the policy's reference, the reward
model and its trainer (`RFTRun`), and what its checkpoints keep (`State`: iterations done, the
held-out demonstrations, the running window, the preference split)."""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from accelerate.utils import gather_object

from ..data import Preference
from ..data.sources import TRAIN_SEED, preference_pairs
from ..encoding import Encoder, Tokenized
from ..generation import GenerationEngine, forward_batch_size
from ..models import load_reward_model
from ..pairs import Pair, pair_from_dict
from ..trainer import Trainer
from .reward_model import (
    HeldOutDemonstrations,
    RewardScorer,
    encode_preference_pairs,
    heldout_ids,
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


TOTAL_KEYS = ("pairs", "negatives_truncated", "demonstrations_truncated")


@dataclass
class State:
    """Where an RFT run is, as its checkpoints keep it: outer iterations done, counts so far, and
    what later iterations depend on and cannot recompute: the held-out demonstrations (and those
    trained on), the window of the KL and reward running means, the preference split. `prepared`:
    the latter are set (at the run's start, or loaded from a checkpoint)."""

    iteration: int = 0
    totals: dict = field(default_factory=lambda: dict.fromkeys(TOTAL_KEYS, 0))
    heldout_ids: set = field(default_factory=set)
    heldout_trained: set = field(default_factory=set)
    window: deque = field(default_factory=lambda: deque(maxlen=10))
    preference_train: list = field(default_factory=list)
    preference_eval: list = field(default_factory=list)
    prepared: bool = False

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "totals": dict(self.totals),
            "heldout_ids": sorted(self.heldout_ids),
            "heldout_trained": sorted(self.heldout_trained),
            "window": [list(w) for w in self.window],
            "preference_train": [asdict(p) for p in self.preference_train],
            "preference_eval": [asdict(p) for p in self.preference_eval],
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.totals = state["iteration"], dict(state["totals"])
        self.heldout_ids, self.heldout_trained = (
            set(state["heldout_ids"]),
            set(state["heldout_trained"]),
        )
        self.window.clear()
        self.window.extend(tuple(w) for w in state["window"])
        self.preference_train = [pair_from_dict(p) for p in state["preference_train"]]
        self.preference_eval = [pair_from_dict(p) for p in state["preference_eval"]]
        self.prepared = True

    def add_negatives(self, pairs: list) -> None:
        self.totals["pairs"] += len(pairs)
        self.totals["negatives_truncated"] += sum(p.rejected_truncated for p in pairs)
        self.totals["demonstrations_truncated"] += sum(p.chosen_truncated for p in pairs)


@dataclass
class RFTRun:
    """What every outer iteration shares."""

    config: object
    trainer: Trainer
    reward_trainer: Trainer
    encoder: Encoder
    out_dir: Path
    reference: object  # None with LoRA: the base with adapters disabled is the reference
    state: State
    engine: GenerationEngine  # the run's: negatives and rollouts are sampled through it
    last_generation_s: float = 0.0

    @property
    def heldout(self) -> HeldOutDemonstrations:
        return HeldOutDemonstrations(self.state.heldout_ids, self.state.heldout_trained)

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
        packed = self.trainer.padding_free  # as the policy's own log-probs in the loss
        with self.trainer.accelerator.autocast():
            if self.reference is None:
                with self.trainer.unwrapped.disable_adapter():
                    return sequence_logps_of(self.trainer.unwrapped, rows, pad, batch, packed)
            return sequence_logps_of(self.reference, rows, pad, batch, packed)

    def shared(self, items: list, score) -> list:
        """`score(items)` spread over the processes (`in_shares`)."""
        return in_shares(self.trainer.accelerator, items, score)

    def margins(self, pairs: list[Pair]) -> list[float]:
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


def read_preference_data(config) -> list[Preference]:
    """The preference pairs of `preference_data`; a source that is not pairs is a DataError
    (`check` reads it once before a new run's folder is taken, to fail early)."""
    return preference_pairs(config.preference_data, None, TRAIN_SEED, task_count=1000)


def _preference_note(config, state: State) -> str:
    """How preference_data is used; with the default weight 0 it trains nothing, which a user
    passing only preference_data= would not guess."""
    train, held = len(state.preference_train), len(state.preference_eval)
    if config.preference_weight:
        use = f"{train} pairs train the reward model (preference_weight={config.preference_weight})"
    else:
        use = f"{train} pairs do not train it (preference_weight=0; set it > 0 to train on them)"
    return f"RFT: preference_data {config.preference_data}: {use}, {held} evaluate it"


def _prepare(state: State, config, encoder: Encoder, n_examples: int) -> None:
    """A new run's held-out demonstrations and preference split (a resumed run loaded them)."""
    if state.prepared:
        return
    state.heldout_ids = heldout_ids(n_examples, config.heldout_fraction, config.seed)
    if config.preference_data:
        raw = read_preference_data(config)
        state.preference_train, state.preference_eval = encode_preference_pairs(
            raw, encoder, config
        )
    state.prepared = True


def set_up_run(ctx) -> RFTRun:
    """The reference, the reward model and its trainer, the state prepared, the schedules."""
    config, trainer, encoder = ctx.config, ctx.trainer, ctx.encoder
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
    _prepare(ctx.state, config, encoder, len(ctx.examples))
    parts = (config, trainer, reward_trainer, encoder, ctx.out_dir, reference, ctx.state)
    run = RFTRun(*parts, ctx.engine)
    _log_memory(run)
    if config.preference_data and trainer.accelerator.is_main_process and config.show_progress:
        print(_preference_note(config, ctx.state))
    reward_trainer.start_schedule(config.outer_iterations * config.reward_steps)
    trainer.start_schedule(config.outer_iterations * config.policy_steps)
    return run
