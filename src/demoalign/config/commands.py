"""The config of every command: the option groups it takes (groups.py), the options only it has,
and, through @options(name=default), its own defaults and single options of groups it does not
otherwise take. A dataclass takes the fields of its LAST base first, so the bases are listed from
the group shown last in `--help` to the one shown first."""

from __future__ import annotations

from pathlib import Path

from ..data.tasks import get_task
from .choices import DTYPES, parse_leaderboard_tasks
from .groups import (
    DataSource,
    Generation,
    GenerationEngine,
    LoRA,
    ModelData,
    Optimisation,
    Output,
    PairwiseLoss,
    RunFolder,
    Runtime,
    Sampling,
    SamplingOrGreedy,
    Sequences,
)
from .options import opt, options


@options()
class TrainConfig(Runtime, LoRA, Optimisation, Sequences, RunFolder, DataSource, ModelData):
    """Options shared by every method."""

    method = "base"


@options(learning_rate=2e-5)
class SFTConfig(TrainConfig):
    """Plain supervised fine-tuning: token-level NLL of the responses."""

    epochs: int = opt(
        1,
        "Passes over the demonstrations (demo: SFT epochs = IRFT/SPIN epochs per stage, so every "
        "arm takes the same optimiser steps).",
        minimum=1,
    )
    method = "sft"


@options()
class IRFTConfig(GenerationEngine, SamplingOrGreedy, PairwiseLoss, TrainConfig):
    """IRFT (docs/algorithms.md §2): T stages per pass, each regenerating negatives with the
    current model."""

    stages: int = opt(
        5,
        "T: chunks of the data per pass; negatives are regenerated at every stage start (SPIN: "
        "always 1; use `demoalign irft` for T > 1).",
        minimum=1,
    )
    epochs_per_stage: int = opt(1, "Passes over a stage's chunk of pairs.", minimum=1)
    iterations: int = opt(
        1,
        "Passes over the whole data set, each restarting the stage loop from the last model.",
        minimum=1,
    )
    reference_logps: str = opt(
        "forward",
        "Reference log-probs of the negatives: forward (a forward pass over them after "
        "generation) or decode (taken from the logits they were sampled from: no forward over the "
        "negatives; equal in fp32; in bf16 a negative's decode log-prob differed from the "
        "forward's by 0.29 nats on average and 1.19 nats at most, measured on an H200).",
        choices=("forward", "decode"),
    )
    optimizer_scope: str = opt(
        "run",
        "run: one optimiser for the whole run, so Adam's moment estimates carry over from stage "
        "to stage (the default: a stage's first steps are not taken with an empty second-moment "
        "estimate); stage: a fresh optimiser and a fresh schedule at every stage start, as the "
        "paper's released training scripts do (one script run per stage).",
        choices=("run", "stage"),
    )
    method = "irft"


@options(stages=1)
class SPINConfig(IRFTConfig):
    """SPIN: IRFT with one stage per pass; `iterations` is the number of SPIN iterations."""

    method = "spin"

    def validate(self) -> None:
        super().validate()
        if self.stages != 1:
            raise ValueError(
                "SPIN has exactly one stage per iteration; use `demoalign irft stages=T` for T > 1"
            )


@options(beta=0.1)
class RFTConfig(GenerationEngine, Sampling, TrainConfig):
    """RFT (docs/algorithms.md §3): an explicit reward model learnt from demonstrations vs the
    policy's own samples, alternating with KL-regularised RL (RLOO) of the policy against it."""

    outer_iterations: int = opt(
        2,
        "T: outer iterations, each a reward step then a policy step, on the next chunk of prompts.",
        minimum=1,
    )
    prompts_per_iteration: int = opt(
        0,
        "Demonstrations (prompts) per outer iteration (0 = the data split evenly over T).",
        minimum=0,
    )
    heldout_fraction: float = opt(
        0.2,
        "Share of each iteration's (demonstration, negative) pairs kept out of the reward step "
        "and used to evaluate it.",
    )
    reward_model: str = opt(
        "",
        "Reward model: a folder loadable by AutoModelForSequenceClassification (num_labels=1). "
        "RFT: the reward model's start, sharing the policy's tokenizer (empty = the policy's "
        "weights with a new scalar head). eval: the model that scores the generations for "
        "`prompts`.",
    )
    reward_loss: str = opt(
        "logistic",
        "logistic: −log σ(r(y) − r(ỹ)) (Bradley–Terry, default); linear: −(r(y) − r(ỹ)) (the "
        "paper's gradient).",
        choices=("logistic", "linear"),
    )
    reward_steps: int = opt(
        20,
        "Reward-model optimiser steps per outer iteration (`batch_size` pairs each).",
        minimum=0,
    )
    reward_learning_rate: float = opt(1e-5, "Peak learning rate of the reward model.", above=0)
    preference_data: str = opt(
        "",
        "Optional real preference pairs (prompt/chosen/rejected or HH chosen/rejected records: "
        "any source `data` takes, a hub id's split and config given as ID[@CONFIG][:SPLIT], or "
        "task:NAME[:SEED]) mixed into the reward step.",
    )
    preference_weight: float = opt(
        0.0,
        "Weight of the preference-pair loss in the reward step (0 = evaluated only).",
        minimum=0,
    )
    policy_steps: int = opt(
        20,
        "Policy optimiser steps per outer iteration; every step samples fresh rollouts.",
        minimum=0,
    )
    rollouts: int = opt(
        4, "k: samples per prompt in a policy step (RLOO's leave-one-out baseline needs k >= 2)."
    )
    method = "rft"

    # Not an option: negatives and rollouts are always sampled (negatives.make_negatives reads it).
    greedy = False

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if self.rollouts < 2:
            raise ValueError(
                "rollouts must be >= 2 (the leave-one-out baseline needs another sample)"
            )


CONFIGS = {"sft": SFTConfig, "irft": IRFTConfig, "spin": SPINConfig, "rft": RFTConfig}


@options(overwrite=False, template="auto", max_prompt_length=128)
class GenerateConfig(Runtime, Generation, SamplingOrGreedy, ModelData):
    """`demoalign generate`: one response per prompt of a data file, with the training rendering."""

    output: str = opt(
        "generations.jsonl", "JSONL file to write: prompt, history, response, tokens, finished."
    )
    dtype: str = opt(
        "auto",
        "Precision the model is loaded in: auto (bfloat16 on a GPU that has it, float32 "
        "elsewhere), float32, bfloat16 or float16. Half precision holds one copy of the "
        "weights; float32 on a GPU holds them twice (the static engine generates on a bf16 copy).",
        choices=DTYPES,
    )
    method = "generate"
    # Old spellings still accepted (with a deprecation line): old key -> new key.
    renamed = {"batch_size": "generation_batch_size"}

    def validate(self) -> None:
        super().validate()
        self.check_output()

    def check_output(self) -> None:
        """Before any model is loaded: the output must not replace the prompts or, unasked, any
        other file."""
        out, data = Path(self.output).expanduser(), Path(self.data).expanduser()
        if out.exists() and data.exists() and out.resolve() == data.resolve():
            raise ValueError(f"output={self.output} is the data file itself; choose another file")
        if out.is_dir():
            raise ValueError(f"output={self.output} is a folder; expected a .jsonl file")
        if out.exists() and not self.overwrite:
            raise ValueError(f"output={self.output} exists; pass overwrite=true to replace it")


# ---------------------------------------------------------------- evaluation

BEAVER_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"


@options(output_dir="runs/eval", max_new_tokens=128, generation_backend="auto", reward_model="")
class EvalConfig(Runtime, SamplingOrGreedy, Sequences, Output):
    """`demoalign eval`: preference-pair, task and reward-model metrics of several models, each
    with a bootstrap interval (docs/algorithms.md §5), written to results.json, report.md and
    plots."""

    models: str = opt(
        "",
        "Comma-separated model folders to evaluate (names in the report: the shortest distinct "
        "path endings).",
    )
    reference: str = opt(
        "",
        "Reference model of the implicit-reward accuracy (e.g. the SFT start); empty = that "
        "metric is skipped.",
    )
    pairs: str = opt(
        "",
        "Preference pairs: prompt/chosen/rejected or HH chosen/rejected records (any source "
        "`data` takes; a hub id's split and config as ID[@CONFIG][:SPLIT], e.g. "
        "Anthropic/hh-rlhf:test), or task:NAME[:SEED] (correct vs plausible-wrong answers).",
    )
    max_pairs: int = opt(0, "Use only the first N pairs (0 = all).")
    task: str = opt(
        "",
        "Built-in task: sort, add or brackets (eval: exact-match of sampled and greedy "
        "generations on its held-out prompts; empty = none).",
    )
    task_prompts: int = opt(100, "Held-out prompts of `task` (drawn with `task_seed`).", minimum=1)
    task_seed: int = opt(2, "Seed of the task's held-out prompts (2 = the demo's held-out set).")
    prompts: str = opt(
        "",
        "Held-out prompts for reward-model scoring: a file of `prompt` strings or any format "
        "`data` accepts.",
    )
    max_prompts: int = opt(0, "Use only the first N prompts (0 = all).")
    reward_template: str = opt(
        BEAVER_TEMPLATE,
        "Text the reward model reads; {prompt} is the last user turn, {response} the generation.",
    )
    reward_max_length: int = opt(
        1024, "Reward-model inputs are cut to this many tokens (from the left).", minimum=1
    )
    baseline: str = opt(
        "",
        "Model folder (one of `models`, or another) that every model is compared with: for every "
        "metric the difference over the same items with a paired bootstrap interval, and, with "
        "prompts= and reward_model=, the win rate of each model's generations against its.",
    )
    leaderboard: str = opt(
        "",
        "lm-evaluation-harness tasks on local files (extra `demoalign[eval]`): `all` or a comma "
        "list of arc_easy, arc_challenge, truthfulqa_mc2, winogrande, gsm8k, hellaswag, mmlu.",
    )
    leaderboard_data: str = opt(
        "",
        "Folder holding arc/, truthfulqa/, winogrande/, gsm8k/, hellaswag/, mmlu/ (empty = "
        "$DEMOALIGN_DATA).",
    )
    leaderboard_limit: int = opt(
        0, "Items per leaderboard task (per MMLU subject) (0 = all).", minimum=0
    )
    mmlu_shots: int = opt(
        4, "MMLU few-shot examples (at most 4: only the dev split, 5 per subject, is local)."
    )
    regenerate: bool = opt(
        True,
        "false: reuse output_dir/generations/<model>.jsonl when present (rescore without "
        "regenerating).",
    )
    run_dir: str = opt(
        "",
        "A training run folder: plot the log-prob gap (demonstration vs negative, under each "
        "stage's start model) over its stages.",
    )
    eval_batch_size: int = opt(
        16,
        "Sequences per forward (pair log-probs, reward-model scores, leaderboard) and prompts per "
        "generate() call.",
        minimum=1,
    )
    bootstrap_resamples: int = opt(1000, "Bootstrap resamples of each interval.", minimum=1)
    confidence: float = opt(0.95, "Coverage of the bootstrap percentile intervals.")
    method = "eval"
    renamed = {"batch_size": "eval_batch_size"}

    @property
    def generation_batch_size(self) -> int:
        """Eval generates with its one batch size (generation.generate_responses reads this)."""
        return self.eval_batch_size

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def validate(self) -> None:
        super().validate()
        if not self.model_list():
            raise ValueError("eval needs models=PATH[,PATH...]")
        if not (self.pairs or self.task or self.prompts or self.leaderboard):
            raise ValueError(
                "nothing to evaluate: give pairs=FILE, task=NAME, prompts=FILE reward_model=PATH "
                "and/or leaderboard=all"
            )
        if self.leaderboard:
            parse_leaderboard_tasks(self.leaderboard)
        if not 0 <= self.mmlu_shots <= 4:
            raise ValueError(
                "mmlu_shots must be in 0..4 (only MMLU's dev split, 5 questions per subject, is "
                "local)"
            )
        if self.prompts and not self.reward_model:
            raise ValueError("prompts=FILE needs reward_model=PATH to score the generations")
        if self.reward_model and not self.prompts:
            raise ValueError(
                "reward_model=PATH needs prompts=FILE (the held-out prompts to generate for)"
            )
        if self.reward_template.count("{response}") != 1:
            raise ValueError("reward_template must contain {response} exactly once")
        if not 0 < self.confidence < 1:
            raise ValueError("confidence must be in (0, 1)")


# ---------------------------------------------------------------- the demo


@options(
    output_dir="runs/demo",
    task="sort",
    epochs=2,
    batch_size=16,
    learning_rate=1e-4,
    max_new_tokens=24,
)
class DemoConfig(PairwiseLoss, Output):
    """Settings of `demoalign demo`: on a built-in task, SFT, SPIN, IRFT and RFT arms from the
    same SFT start, compared over seeds (copy recipes/demo.yaml and change them)."""

    seeds: int = opt(3, "Seeds per arm (the paired test needs at least 2).")
    arms: str = opt(
        "sft,spin,irft_T4,irft_T8,irft_T8@sft1,rft",
        "Arms, comma-separated: sft, spin, irft_T<k>, rft; a spin/irft arm may end in @sft<w> to "
        "override sft_weight for it (e.g. irft_T8@sft1).",
    )
    hidden_size: int = opt(128, "Width of the tiny model.")
    layers: int = opt(3, "Layers of the tiny model.")
    vocab_size: int = opt(300, "Vocabulary of the tokenizer trained on the task's text.")
    start_examples: int = opt(4000, "Demonstrations for the SFT that makes the start model.")
    start_epochs: int = opt(4, "Epochs of that SFT.")
    start_learning_rate: float = opt(3e-3, "Learning rate of that SFT.")
    train_examples: int = opt(512, "Demonstrations every arm trains on (the same for all arms).")
    sft_learning_rate: float = opt(1e-4, "Learning rate of the continued-SFT arm.")
    eval_prompts: int = opt(300, "Held-out prompts (and pairs) for the metrics.")
    stage_eval_prompts: int = opt(100, "Held-out prompts (and pairs) for the curves over stages.")
    rft_outer_iterations: int = opt(
        2, "RFT arm: outer iterations; its policy steps add up to the other arms' steps."
    )
    rft_reward_steps: int = opt(
        30, "RFT arm: reward-model steps per outer iteration (not counted in the budget)."
    )
    rft_reward_learning_rate: float = opt(1e-4, "RFT arm: learning rate of the reward model.")
    rft_beta: float = opt(0.5, "RFT arm: KL weight β of the policy step.")
    rft_rollouts: int = opt(4, "RFT arm: samples per prompt (RLOO).")
    method = "demo"

    def validate(self) -> None:
        super().validate()
        get_task(self.task)
        if self.seeds < 2:
            raise ValueError("seeds must be >= 2 for the paired test")
        arm_names = self.arm_list()
        if "sft" not in arm_names:
            raise ValueError("arms must include sft (every arm is compared with it)")
        for arm in arm_names:
            parse_arm(arm)

    def arm_list(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()]


def parse_arm(arm: str) -> tuple[str, int, float | None]:
    """'sft' | 'spin' | 'rft' | 'irft_T<k>', optionally '@sft<w>' on spin/irft → (method, stages,
    sft_weight or None)."""
    base, _, suffix = arm.partition("@")
    weight = None
    if suffix:
        try:
            assert suffix.startswith("sft") and base != "sft"
            weight = float(suffix[3:])
        except (AssertionError, ValueError):
            raise ValueError(
                f"arm {arm!r}: the suffix must be @sft<weight> on a spin or irft arm"
            ) from None
    if base in ("sft", "spin", "rft"):
        if base == "rft" and weight is not None:
            raise ValueError(f"arm {arm!r}: @sft<w> applies to spin and irft arms only")
        return base, 1, weight
    if base.startswith("irft_T") and base[6:].isdigit() and int(base[6:]) >= 1:
        return "irft", int(base[6:]), weight
    raise ValueError(f"unknown arm {arm!r}: use sft, spin, rft or irft_T<k> (optionally @sft<w>)")
