"""Run configuration: dataclasses are the one source of truth for every option, its default and
its documentation (`--help` and the README's reference are generated from them)."""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .data.tasks import get_task


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def check_types_and_finite(config) -> None:
    """Every option has its declared type (a config built in Python skips the CLI's parsing) and
    every float is finite: `beta=nan` or `learning_rate=inf` would train on garbage."""
    for f in fields(config):
        target = f.type if isinstance(f.type, type) else _TYPES.get(f.type)
        value = getattr(config, f.name)
        if target is None:
            continue
        ok = isinstance(value, target) and not (target is not bool and isinstance(value, bool))
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"config key `{f.name}` expects {target.__name__}, got {value!r}")
        if target is float and not math.isfinite(value):
            raise ValueError(f"config key `{f.name}` must be a finite number, got {value!r}")


@dataclass
class TrainConfig:
    """Options shared by every method."""

    model: str = opt(
        "", "Path (or hub id, when a hub is reachable) of the causal LM to start from."
    )
    data: str = opt(
        "",
        "Demonstrations: a JSONL/JSON/Parquet/CSV file, a saved HF dataset folder, a dataset "
        "repository folder (data files, a README.md listing `configs:`) or a Hugging Face Hub "
        "data set id (e.g. HuggingFaceH4/ultrachat_200k), or task:NAME[:SEED] (built-in tasks: "
        "sort, add, brackets).",
    )
    data_split: str = opt(
        "",
        "Split of a hub id or dataset folder; empty = `train`, else the one split whose name "
        "starts with `train` (train_sft), else the only split (an error lists the splits).",
    )
    data_config: str = opt(
        "", "Config (subset) of a hub id or dataset folder; empty = its default config."
    )
    data_revision: str = opt(
        "", "Revision (branch, tag or commit) of a hub id; empty = the default branch."
    )
    columns: str = opt(
        "",
        "Explicit column mapping for unrecognised files, e.g. 'prompt:question,response:answer'.",
    )
    max_examples: int = opt(0, "Use only the first N records of `data` (0 = all).")
    output_dir: str = opt("runs/out", "Run folder: config.yaml, metrics.jsonl, stages/, final/.")
    overwrite: bool = opt(
        False,
        "Replace an earlier run in output_dir: only a folder demoalign created (it holds the "
        ".demoalign-run marker), never the working directory or a parent of it, a folder holding "
        "this run's model or data, or a live run's folder (it is locked).",
    )
    seed: int = opt(0, "Seed for shuffling, chunking, sampling and initialisation.")
    template: str = opt(
        "auto",
        "Prompt rendering: auto (chat template if the tokenizer has one, else instruction), chat, "
        "instruction, hh, plain.",
    )
    max_length: int = opt(512, "Maximum tokens of prompt + response; the response is cut to fit.")
    max_prompt_length: int = opt(
        128, "Maximum prompt tokens; longer prompts lose their beginning (cut from the left)."
    )
    learning_rate: float = opt(5e-7, "Peak learning rate.")
    optimizer: str = opt("adamw", "adamw or rmsprop (the paper's).")
    weight_decay: float = opt(0.0, "Decoupled weight decay (AdamW) or L2 (RMSprop).")
    lr_scheduler: str = opt(
        "linear", "linear (warm-up then linear decay to 0) or constant (warm-up then flat)."
    )
    warmup_ratio: float = opt(
        0.1, "Share of the schedule's steps spent warming up linearly from 0."
    )
    schedule_scope: str = opt(
        "run",
        "run: one schedule over all optimiser steps of the run; stage: the schedule restarts at "
        "every stage.",
    )
    batch_size: int = opt(8, "Examples (pairs for IRFT/SPIN) per micro-batch per process.")
    gradient_accumulation_steps: int = opt(
        1, "Micro-batches per optimiser step. Global batch = batch_size x this x processes."
    )
    max_grad_norm: float = opt(
        1.0, "Clip the global gradient norm to this (0 = no clipping; the norm is still logged)."
    )
    mixed_precision: str = opt(
        "auto", "auto (bf16 on a GPU that supports it, else fp32), bf16, fp16 or no."
    )
    gradient_checkpointing: bool = opt(
        False, "Activation checkpointing: less memory, about 20% slower."
    )
    disable_dropout: bool = opt(
        True, "Set every dropout to 0, so the first step of a stage sees u = 0 exactly."
    )
    lora_r: int = opt(
        0,
        "LoRA rank of the policy (peft); 0 = full fine-tuning. Only the adapters train (the "
        "optimiser holds only them). IRFT/SPIN: the stage reference is the stage-start adapted "
        "model (its log-probs are taken at the stage start; no copy). RFT: the KL reference is "
        "the base model with the adapters disabled (no copy).",
    )
    lora_alpha: int = opt(16, "LoRA alpha (scale alpha / r).")
    lora_target_modules: str = opt(
        "all-linear",
        "Modules that get adapters: all-linear, or comma-separated names (e.g. q_proj,v_proj).",
    )
    lora_keep_adapters: bool = opt(
        False,
        "With lora_r > 0: also save the trained adapters (peft) to final_adapters/; final/ is "
        "always the merged model.",
    )
    cpu: bool = opt(False, "Run on the CPU even when a GPU is present.")
    show_progress: bool = opt(True, "Progress bars on the main process.")
    report_to: str = opt(
        "none",
        "Experiment trackers that also get every metrics.jsonl record (through accelerate): none, "
        "tensorboard (OUT/trackers/demoalign/), wandb, mlflow, or a comma list; the names are "
        "in the README's 'Trackers'.",
    )
    save_steps: int = opt(
        0,
        "Also checkpoint every N optimiser steps inside SFT epochs and IRFT/SPIN stages (0 = only "
        "at boundaries: SFT epoch ends, IRFT/SPIN stage ends, RFT outer-iteration ends; RFT "
        "checkpoints at those only). Checkpoints go to checkpoints/<step>/.",
    )
    keep_checkpoints: int = opt(
        2,
        "Keep the last N complete checkpoints (older ones are deleted); 0 = write none (a short "
        "run or a sweep that will never be resumed: no time spent saving optimiser state).",
    )
    resume: bool = opt(
        False,
        "Continue the run in output_dir from its last complete checkpoint (the config must equal "
        "that run's config.yaml except resume, show_progress and overwrite); a folder with "
        "nothing to resume starts the run. The result is the uninterrupted run's, bit for bit "
        "on CPU in fp32.",
    )

    method = "base"

    def validate(self) -> None:
        check_types_and_finite(self)
        if not self.model:
            raise ValueError(
                "config key `model` is required (a model folder; `demoalign tiny-model OUT` makes "
                "one)"
            )
        if not self.data:
            raise ValueError("config key `data` is required (a demonstration file or folder)")
        if self.data.startswith("task:") and (
            self.data_split or self.data_config or self.data_revision
        ):
            raise ValueError("data_split, data_config and data_revision do not apply to task:")
        choices = {
            "optimizer": ("adamw", "rmsprop"),
            "lr_scheduler": ("linear", "constant"),
            "schedule_scope": ("run", "stage"),
            "mixed_precision": ("auto", "bf16", "fp16", "no"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}"
                )
        for key in ("batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.resume and self.keep_checkpoints == 0:
            raise ValueError("resume=true needs checkpoints: keep_checkpoints must be >= 1")
        for key in ("weight_decay", "max_grad_norm", "max_examples", "save_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        from .tracking import check_trackers  # a missing package: one error, nothing created

        check_trackers(self.report_to)
        if self.lora_r < 0 or (self.lora_r and self.lora_alpha <= 0):
            raise ValueError("lora_r must be >= 0 and lora_alpha > 0")
        if self.lora_r and not self.lora_target_modules.strip(" ,"):
            raise ValueError("lora_target_modules is empty: all-linear or comma-separated names")


@dataclass
class SFTConfig(TrainConfig):
    """Plain supervised fine-tuning: token-level NLL of the responses."""

    learning_rate: float = opt(2e-5, "Peak learning rate.")
    epochs: int = opt(1, "Passes over the demonstrations.")
    method = "sft"

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


GENERATION_BACKEND_HELP = (
    "Generation engine: auto (static on CUDA, hf on CPU), hf (transformers generate with a "
    "dynamic cache, the training weights under autocast) or static (transformers static KV "
    "cache; on CUDA a compiled decode step on a bf16 copy of the weights, refreshed in place at "
    "every stage and freed during training)."
)


DTYPES = ("auto", "float32", "bfloat16", "float16")
PARK_CHOICES = ("auto", "on", "off")
PARK_HELP = (
    "While negatives and their reference log-probs are computed, move the optimiser's state "
    "(Adam's moments, RMSprop's averages) to host memory and back, so that generation's KV cache "
    "can use that GPU memory and generation's peak stays below training's: auto (on when training "
    "on a GPU, except under DeepSpeed, which owns its optimiser's memory), on, or off. Costs one "
    "copy of the state each way per stage (RFT: for its negatives, not for the rollouts of its "
    "policy steps). Training is unchanged; only with generation_backend=hf and an auto batch "
    "on a GPU can the freed memory make larger generation batches, and so other samples. With "
    "off on a GPU, "
    "generation_batch_size=auto is still sized at the first stage, before the optimiser holds "
    "any state: give an integer batch if memory is tight."
)


def _check_backend(backend: str) -> None:
    from .generation import BACKENDS  # here: generation imports torch, `--help` should not

    if backend not in BACKENDS:
        raise ValueError(f"generation_backend={backend!r}: choose one of {', '.join(BACKENDS)}")


def validate_sampling(config) -> None:
    """The sampling options of every config that generates, checked in one place."""
    greedy = getattr(config, "greedy", False)  # RFT always samples: no greedy option
    if not greedy and config.temperature <= 0:
        hint = " (set greedy=true for greedy decoding)" if "greedy" in _field_names(config) else ""
        raise ValueError(f"temperature must be > 0 when sampling{hint}")
    if not 0 < config.top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if config.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")


def _field_names(config) -> set[str]:
    return {f.name for f in fields(config)}


def _batch_size_text(value):
    """generation_batch_size is `auto` or an integer; an int given from Python is kept as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def validate_generation(config) -> None:
    """generation_backend and generation_batch_size (an int, or `auto`) of a generating config."""
    from .generation import parse_batch_size

    _check_backend(config.generation_backend)
    if config.park_optimizer_state not in PARK_CHOICES:
        raise ValueError(
            f"park_optimizer_state={config.park_optimizer_state!r}: "
            f"choose one of {', '.join(PARK_CHOICES)}"
        )
    try:
        parse_batch_size(config.generation_batch_size)
    except ValueError:
        raise ValueError(
            f"generation_batch_size={config.generation_batch_size!r}: "
            "expected an integer >= 1 or auto"
        ) from None


@dataclass
class IRFTConfig(TrainConfig):
    """IRFT (docs/algorithms.md §2): T stages per pass, each regenerating negatives with the
    current model."""

    stages: int = opt(
        5, "T: chunks of the data per pass; negatives are regenerated at every stage start."
    )
    epochs_per_stage: int = opt(1, "Passes over a stage's chunk of pairs.")
    iterations: int = opt(
        1, "Passes over the whole data set, each restarting the stage loop from the last model."
    )
    beta: float = opt(0.1, "β of the implicit reward r = β log(π/π_ref).")
    loss_type: str = opt(
        "sigmoid", "sigmoid (the paper's −log σ(u)), hinge max(0, 1−u), or linear −u."
    )
    sft_weight: float = opt(
        0.0,
        "Weight of an extra NLL term on the demonstrations (per-token mean; 0 = the paper's loss).",
    )
    max_new_tokens: int = opt(256, "Tokens generated per negative.")
    temperature: float = opt(1.0, "Sampling temperature of the negatives.")
    top_p: float = opt(1.0, "Nucleus sampling of the negatives (1 = off).")
    greedy: bool = opt(
        False, "Greedy negatives instead of sampled ones (not the paper's method; off by default)."
    )
    generation_batch_size: str = opt(
        "auto",
        "Prompts per generate() call: an integer, or auto (the largest batch that fits in free GPU "
        "memory; 16 on CPU). Also the batch of the reference forward (16 with auto).",
    )
    generation_backend: str = opt("auto", GENERATION_BACKEND_HELP)
    park_optimizer_state: str = opt("auto", PARK_HELP)
    reference_logps: str = opt(
        "forward",
        "Reference log-probs of the negatives: forward (a forward pass over them after "
        "generation) or decode (taken from the logits they were sampled from: no forward over the "
        "negatives; equal in fp32, within about 0.1 nats per sequence in bf16).",
    )
    optimizer_scope: str = opt(
        "run",
        "run: one optimiser for the whole run, so Adam's moment estimates carry over from stage "
        "to stage (the default: a stage's first steps are not taken with an empty second-moment "
        "estimate); stage: a fresh optimiser and a fresh schedule at every stage start, as the "
        "paper's released training scripts do (one script run per stage).",
    )
    method = "irft"

    def __post_init__(self):
        self.generation_batch_size = _batch_size_text(self.generation_batch_size)

    def validate(self) -> None:
        super().validate()
        from .losses import LOSS_TYPES

        validate_generation(self)
        if self.optimizer_scope not in ("run", "stage"):
            raise ValueError(f"optimizer_scope={self.optimizer_scope!r}: choose one of run, stage")
        if self.reference_logps not in ("forward", "decode"):
            raise ValueError(
                f"reference_logps={self.reference_logps!r}: choose one of forward, decode"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.sft_weight < 0:
            raise ValueError("sft_weight must be >= 0")
        validate_sampling(self)
        for key in ("stages", "epochs_per_stage", "iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")


@dataclass
class SPINConfig(IRFTConfig):
    """SPIN: IRFT with one stage per pass; `iterations` is the number of SPIN iterations."""

    stages: int = opt(1, "Always 1 for SPIN (use `demoalign irft` for T > 1).")
    method = "spin"

    def validate(self) -> None:
        super().validate()
        if self.stages != 1:
            raise ValueError(
                "SPIN has exactly one stage per iteration; use `demoalign irft stages=T` for T > 1"
            )


# ---------------------------------------------------------------- RFT


@dataclass
class RFTConfig(TrainConfig):
    """RFT (docs/algorithms.md §3): an explicit reward model learnt from demonstrations vs the
    policy's own
    samples, alternating with KL-regularised RL (RLOO) of the policy against it."""

    outer_iterations: int = opt(
        2,
        "T: outer iterations, each a reward step then a policy step, on the next chunk of prompts.",
    )
    prompts_per_iteration: int = opt(
        0, "Demonstrations (prompts) per outer iteration (0 = the data split evenly over T)."
    )
    heldout_fraction: float = opt(
        0.2,
        "Share of each iteration's (demonstration, negative) pairs kept out of the reward step "
        "and used to evaluate it.",
    )
    reward_model: str = opt(
        "",
        "Reward-model start: a folder loadable by AutoModelForSequenceClassification "
        "(num_labels=1) sharing the policy's tokenizer; empty = the policy's weights with a new "
        "scalar head.",
    )
    reward_loss: str = opt(
        "logistic",
        "logistic: −log σ(r(y) − r(ỹ)) (Bradley–Terry, default); linear: −(r(y) − r(ỹ)) (the "
        "paper's gradient).",
    )
    reward_steps: int = opt(
        20, "Reward-model optimiser steps per outer iteration (`batch_size` pairs each)."
    )
    reward_learning_rate: float = opt(1e-5, "Peak learning rate of the reward model.")
    preference_data: str = opt(
        "",
        "Optional real preference pairs (prompt/chosen/rejected or HH chosen/rejected records: "
        "any source `data` takes, a hub id's split and config given as ID[@CONFIG][:SPLIT], or "
        "task:NAME[:SEED]) mixed into the reward step.",
    )
    preference_weight: float = opt(
        0.0, "Weight of the preference-pair loss in the reward step (0 = evaluated only)."
    )
    policy_steps: int = opt(
        20, "Policy optimiser steps per outer iteration; every step samples fresh rollouts."
    )
    rollouts: int = opt(
        4, "k: samples per prompt in a policy step (RLOO's leave-one-out baseline needs k >= 2)."
    )
    beta: float = opt(
        0.1,
        "β: weight of the KL to the initial policy (the shaped reward is r − β (log π − log "
        "π_ref)).",
    )
    max_new_tokens: int = opt(256, "Tokens generated per negative and per rollout.")
    temperature: float = opt(1.0, "Sampling temperature of negatives and rollouts.")
    top_p: float = opt(1.0, "Nucleus sampling of negatives and rollouts (1 = off).")
    generation_batch_size: str = opt(
        "auto",
        "Prompts per generate() call (negatives, rollouts): an integer, or auto (the largest "
        "batch that fits in free GPU memory; 16 on CPU); also sequences per scoring "
        "batch (16 with auto). With the static engine auto is measured once, at the first "
        "negatives, before either optimiser holds state, and rollouts run beside that state: "
        "on a GPU with little memory to spare, give an integer.",
    )
    generation_backend: str = opt("auto", GENERATION_BACKEND_HELP)
    park_optimizer_state: str = opt("auto", PARK_HELP)
    method = "rft"

    def __post_init__(self):
        self.generation_batch_size = _batch_size_text(self.generation_batch_size)

    # Not an option: negatives and rollouts are always sampled (negatives.make_negatives reads it).
    greedy = False

    def validate(self) -> None:
        super().validate()
        if self.reward_loss not in ("logistic", "linear"):
            raise ValueError(f"reward_loss={self.reward_loss!r}: choose one of logistic, linear")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        validate_sampling(self)  # RFT's policy gradient needs sampled rollouts: no greedy option
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if self.preference_weight < 0:
            raise ValueError("preference_weight must be >= 0")
        if self.reward_learning_rate <= 0:
            raise ValueError("reward_learning_rate must be > 0")
        if self.rollouts < 2:
            raise ValueError(
                "rollouts must be >= 2 (the leave-one-out baseline needs another sample)"
            )
        validate_generation(self)
        for key in ("outer_iterations",):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        for key in ("reward_steps", "policy_steps", "prompts_per_iteration"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0")


CONFIGS = {"sft": SFTConfig, "irft": IRFTConfig, "spin": SPINConfig, "rft": RFTConfig}


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value, f):
    """YAML gives typed values; `key=value` strings are parsed as YAML scalars, then checked."""
    target = (
        f.type
        if isinstance(f.type, type)
        else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    )
    if f.name == "columns" and isinstance(value, dict):  # a YAML mapping of prompt/response columns
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, str) and target in (int, float):
        try:
            value = target(value)
        except ValueError:
            raise ValueError(
                f"config key `{f.name}` expects {target.__name__}, got {value!r}"
            ) from None
    elif isinstance(value, str) and target is bool:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"config key `{f.name}` expects bool, got {value!r}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if target is str and value is not None and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ValueError(f"config key `{f.name}` expects {target.__name__}, got {value!r}")
    return value


def build_config(cls, values: dict):
    """A validated config from a mapping; unknown keys name the nearest valid one."""
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in by_name:
            raise ValueError(
                f"unknown config key `{key}` for {cls.method}{_nearest(key, list(by_name))}"
            )
        kwargs[key] = _coerce(value, by_name[key])
    config = cls(**kwargs)
    config.validate()
    return config


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_config(cls, config_file: str | None, overrides: list[str]):
    values = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{config_file}: invalid YAML ({_one_line(exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_file}: cannot read the config file ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of config keys")
        loaded.pop("method", None)
        values.update(loaded)
    values.update(parse_overrides(overrides))
    return build_config(cls, values)


def config_to_dict(config) -> dict:
    return {"method": config.method, **asdict(config)}


def option_docs(cls) -> list[tuple[str, str, str]]:
    """(key, default, help) for every option of a config class."""
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else ""
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows


@dataclass
class GenerateConfig:
    """`demoalign generate`: one response per prompt of a data file, with the training rendering."""

    model: str = opt("", "Model folder to sample from.")
    data: str = opt("", "File of prompts (any format `data` accepts; responses are ignored).")
    columns: str = opt("", "Explicit column mapping, as for training.")
    max_examples: int = opt(0, "Use only the first N records (0 = all).")
    output: str = opt(
        "generations.jsonl", "JSONL file to write: prompt, history, response, tokens, finished."
    )
    overwrite: bool = opt(
        False, "Replace an existing `output` file (never the `data` file itself)."
    )
    template: str = opt("auto", "Prompt rendering, as for training.")
    max_prompt_length: int = opt(128, "Prompts are cut from the left to this many tokens.")
    max_new_tokens: int = opt(256, "Tokens generated per prompt.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling (1 = off).")
    greedy: bool = opt(False, "Greedy decoding instead of sampling.")
    batch_size: str = opt(
        "auto",
        "Prompts per generate() call: an integer, or auto (the largest batch that fits in free "
        "GPU memory; 16 on CPU). With auto on a GPU the batches, and so the samples of a seed, "
        "depend on the free memory: give an integer for samples that depend on the seed alone.",
    )
    dtype: str = opt(
        "auto",
        "Precision the model is loaded in: auto (bfloat16 on a GPU that has it, float32 "
        "elsewhere), float32, bfloat16 or float16. Half precision holds one copy of the "
        "weights; float32 on a GPU holds them twice (the static engine generates on a bf16 copy).",
    )
    generation_backend: str = opt("auto", GENERATION_BACKEND_HELP)
    seed: int = opt(0, "Sampling seed.")
    cpu: bool = opt(False, "Use the CPU even when a GPU is present.")
    method = "generate"

    def __post_init__(self):
        self.batch_size = _batch_size_text(self.batch_size)

    def validate(self) -> None:
        from .generation import parse_batch_size

        check_types_and_finite(self)
        if not self.model or not self.data:
            raise ValueError("generate needs model=PATH and data=FILE")
        validate_sampling(self)
        _check_backend(self.generation_backend)
        try:
            parse_batch_size(self.batch_size)
        except ValueError:
            raise ValueError(
                f"batch_size={self.batch_size!r}: expected an integer >= 1 or auto"
            ) from None
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
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


@dataclass
class EvalConfig:
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
        "", "Built-in task (sort, add, brackets) for exact-match of sampled and greedy generations."
    )
    task_prompts: int = opt(100, "Held-out prompts of `task` (drawn with `task_seed`).")
    task_seed: int = opt(2, "Seed of the task's held-out prompts (2 = the demo's held-out set).")
    prompts: str = opt(
        "",
        "Held-out prompts for reward-model scoring: a file of `prompt` strings or any format "
        "`data` accepts.",
    )
    max_prompts: int = opt(0, "Use only the first N prompts (0 = all).")
    reward_model: str = opt(
        "",
        "AutoModelForSequenceClassification folder (num_labels must be 1) that scores generations.",
    )
    reward_template: str = opt(
        BEAVER_TEMPLATE,
        "Text the reward model reads; {prompt} is the last user turn, {response} the generation.",
    )
    reward_max_length: int = opt(
        1024, "Reward-model inputs are cut to this many tokens (from the left)."
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
    leaderboard_limit: int = opt(0, "Items per leaderboard task (per MMLU subject) (0 = all).")
    mmlu_shots: int = opt(
        4, "MMLU few-shot examples (at most 4: only the dev split, 5 per subject, is local)."
    )
    regenerate: bool = opt(
        True,
        "false: reuse output_dir/generations/<model>.jsonl when present (rescore without "
        "regenerating).",
    )
    output_dir: str = opt(
        "runs/eval", "Folder of results.json, report.md, the plots and generations/."
    )
    overwrite: bool = opt(
        False, "Replace results.json and report.md of an earlier evaluation in output_dir."
    )
    run_dir: str = opt(
        "",
        "A training run folder: plot the log-prob gap (demonstration vs negative, under each "
        "stage's start model) over its stages.",
    )
    template: str = opt("auto", "Prompt rendering, as for training.")
    max_length: int = opt(
        512,
        "Maximum tokens of prompt + response when scoring pairs; responses are cut to fit, as in "
        "training.",
    )
    max_prompt_length: int = opt(128, "Prompts are cut from the left to this many tokens.")
    max_new_tokens: int = opt(128, "Tokens generated per prompt.")
    temperature: float = opt(1.0, "Sampling temperature of generations.")
    top_p: float = opt(1.0, "Nucleus sampling of generations (1 = off).")
    greedy: bool = opt(
        False, "Greedy generations for reward-model scoring instead of sampled ones."
    )
    batch_size: int = opt(16, "Sequences per forward / prompts per generate() call.")
    generation_backend: str = opt("auto", GENERATION_BACKEND_HELP)
    seed: int = opt(0, "Seed of sampling and of the bootstrap.")
    bootstrap_resamples: int = opt(1000, "Bootstrap resamples of each interval.")
    confidence: float = opt(0.95, "Coverage of the bootstrap percentile intervals.")
    cpu: bool = opt(False, "Use the CPU even when a GPU is present.")
    method = "eval"

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def validate(self) -> None:
        check_types_and_finite(self)
        if not self.model_list():
            raise ValueError("eval needs models=PATH[,PATH...]")
        _check_backend(self.generation_backend)
        if not (self.pairs or self.task or self.prompts or self.leaderboard):
            raise ValueError(
                "nothing to evaluate: give pairs=FILE, task=NAME, prompts=FILE reward_model=PATH "
                "and/or leaderboard=all"
            )
        if self.leaderboard:
            from .eval.leaderboard import parse_tasks  # here: eval imports config

            parse_tasks(self.leaderboard)
        if not 0 <= self.mmlu_shots <= 4:
            raise ValueError(
                "mmlu_shots must be in 0..4 (only MMLU's dev split, 5 questions per subject, is "
                "local)"
            )
        if self.leaderboard_limit < 0:
            raise ValueError("leaderboard_limit must be >= 0")
        if self.prompts and not self.reward_model:
            raise ValueError("prompts=FILE needs reward_model=PATH to score the generations")
        if self.reward_model and not self.prompts:
            raise ValueError(
                "reward_model=PATH needs prompts=FILE (the held-out prompts to generate for)"
            )
        if self.reward_template.count("{response}") != 1:
            raise ValueError("reward_template must contain {response} exactly once")
        validate_sampling(self)
        if not 0 < self.confidence < 1:
            raise ValueError("confidence must be in (0, 1)")
        for key in (
            "task_prompts",
            "max_length",
            "max_prompt_length",
            "batch_size",
            "bootstrap_resamples",
            "reward_max_length",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")


# ---------------------------------------------------------------- the demo


@dataclass
class DemoConfig:
    """Settings of `demoalign demo` (copy recipes/demo.yaml and change them)."""

    output_dir: str = opt(
        "runs/demo", "Folder of results.json, report.md, the plots and every arm's run."
    )
    overwrite: bool = opt(False, "Replace an existing demo folder.")
    task: str = opt("sort", "Built-in task: sort, add or brackets.")
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
    epochs: int = opt(
        2, "Passes over them (SFT epochs = IRFT/SPIN epochs per stage: equal optimiser steps)."
    )
    batch_size: int = opt(16, "Examples or pairs per optimiser step.")
    sft_learning_rate: float = opt(1e-4, "Learning rate of the continued-SFT arm.")
    learning_rate: float = opt(1e-4, "Learning rate of the SPIN and IRFT arms.")
    beta: float = opt(0.1, "β of SPIN/IRFT.")
    loss_type: str = opt("sigmoid", "Pairwise loss of SPIN/IRFT.")
    sft_weight: float = opt(0.0, "SFT term added to the SPIN/IRFT loss (0 = the paper's loss).")
    eval_prompts: int = opt(300, "Held-out prompts (and pairs) for the metrics.")
    stage_eval_prompts: int = opt(100, "Held-out prompts (and pairs) for the curves over stages.")
    max_new_tokens: int = opt(24, "Tokens generated per negative and per evaluation response.")
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
        check_types_and_finite(self)
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
    """'sft' | 'spin' | 'irft_T<k>', optionally '@sft<w>' → (method, stages, sft_weight or None)."""
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
