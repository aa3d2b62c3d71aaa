"""Option groups: each option shared by several commands is declared once, here, with the rules
that tie it to the other options of its group (each group's `validate`). The command configs
(commands.py) are made of these groups."""

from __future__ import annotations

from dataclasses import fields

from .choices import (
    GENERATION_BACKENDS,
    LOSS_TYPES,
    PARK_CHOICES,
    RESUME_MAY_DIFFER,
    batch_size_text,
    check_trackers,
    parse_batch_size,
)
from .options import Options, opt, options


@options()
class ModelData(Options):
    """The start model and the demonstrations."""

    model: str = opt(
        "",
        "Path (or hub id, when a hub is reachable) of the causal LM to train from (generate: to "
        "sample from).",
    )
    data: str = opt(
        "",
        "Demonstrations: a JSONL/JSON/Parquet/CSV file, a saved HF dataset folder, a dataset "
        "repository folder (data files, a README.md listing `configs:`) or a Hugging Face Hub "
        "data set id (e.g. HuggingFaceH4/ultrachat_200k; ID[@CONFIG][:SPLIT] picks a config and "
        "split), or task:NAME[:SEED] (built-in tasks: sort, add, brackets). generate reads only "
        "their prompts (responses are ignored).",
    )
    columns: str = opt(
        "",
        "Explicit column mapping for unrecognised files, e.g. 'prompt:question,response:answer'.",
    )
    max_examples: int = opt(0, "Use only the first N records of `data` (0 = all).", minimum=0)

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ValueError(
                "config key `model` is required (a model folder; `demoalign tiny-model OUT` makes "
                "one)"
            )
        if not self.data:
            raise ValueError("config key `data` is required (a demonstration file or folder)")


@options()
class DataSource(Options):
    """Which part of a hub data set or dataset repository folder `data` names (training)."""

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

    def validate(self) -> None:
        super().validate()
        choosing = self.data_split or self.data_config or self.data_revision
        if self.data.startswith("task:") and choosing:
            raise ValueError("data_split, data_config and data_revision do not apply to task:")


@options()
class Output(Options):
    """The folder a command writes, and whether it may replace an earlier one."""

    output_dir: str = opt(
        "runs/out",
        "Folder the command writes: a training run's config.yaml, metrics.jsonl, stages/ and "
        "final/; eval's results.json, report.md, plots and generations/; the demo's results.json, "
        "report.md, plots and every arm's run.",
    )
    overwrite: bool = opt(
        False,
        "Replace an earlier result. Training and the demo replace only a folder demoalign created "
        "(it holds the .demoalign-run marker), never the working directory or a parent of it, a "
        "folder holding this run's model or data, or a live run's folder (it is locked); eval "
        "replaces results.json and report.md in output_dir; generate replaces an existing "
        "`output` file (never its `data` file).",
    )


@options()
class RunFolder(Output):
    """A training run's folder: checkpoints, resuming, what is reported while it runs."""

    resume: bool = opt(
        False,
        "Continue the run in output_dir from its last complete checkpoint (the config must equal "
        f"that run's config.yaml except {', '.join(RESUME_MAY_DIFFER)}); a folder with nothing "
        "to resume starts the run. The result is the uninterrupted run's, bit for bit on CPU in "
        "fp32.",
    )
    keep_checkpoints: int = opt(
        2,
        "Keep the last N complete checkpoints (older ones are deleted); 0 = write none (a short "
        "run or a sweep that will never be resumed: no time spent saving optimiser state).",
        minimum=0,
    )
    save_steps: int = opt(
        0,
        "Also checkpoint every N optimiser steps inside SFT epochs and IRFT/SPIN stages (0 = only "
        "at boundaries: SFT epoch ends, IRFT/SPIN stage ends, RFT outer-iteration ends; RFT "
        "checkpoints at those only). Checkpoints go to checkpoints/<step>/.",
        minimum=0,
    )
    report_to: str = opt(
        "none",
        "Experiment trackers that also get every metrics.jsonl record (through accelerate): none, "
        "tensorboard (OUT/trackers/demoalign/), wandb, mlflow, or a comma list; the names are "
        "in the README's 'Trackers'.",
    )
    show_progress: bool = opt(True, "Progress bars on the main process.")

    def validate(self) -> None:
        super().validate()
        if self.resume and self.keep_checkpoints == 0:
            raise ValueError("resume=true needs checkpoints: keep_checkpoints must be >= 1")
        check_trackers(self.report_to)  # a missing package: one error, before anything is created


@options()
class Sequences(Options):
    """How prompts and responses become token sequences."""

    template: str = opt(
        "auto",
        "Prompt rendering: auto (chat template if the tokenizer has one, else instruction), chat, "
        "instruction, hh, plain.",
    )
    max_length: int = opt(
        512,
        "Maximum tokens of prompt + response (eval: of a scored pair's sequence); the response is "
        "cut to fit.",
        minimum=1,
    )
    max_prompt_length: int = opt(
        128,
        "Maximum prompt tokens; longer prompts lose their beginning (cut from the left).",
        minimum=1,
    )

    def validate(self) -> None:
        super().validate()
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} must be smaller than "
                f"max_length={self.max_length}, which also holds the response; raise max_length "
                "or lower max_prompt_length"
            )


@options()
class Optimisation(Options):
    """Optimiser, schedule, batches and precision of training."""

    learning_rate: float = opt(
        5e-7,
        "Peak learning rate (RFT: the policy's; demo: the SPIN and IRFT arms', while "
        "sft_learning_rate is the continued-SFT arm's).",
        above=0,
    )
    optimizer: str = opt("adamw", "adamw or rmsprop (the paper's).", choices=("adamw", "rmsprop"))
    weight_decay: float = opt(0.0, "Decoupled weight decay (AdamW) or L2 (RMSprop).", minimum=0)
    lr_scheduler: str = opt(
        "linear",
        "linear (warm-up then linear decay to 0) or constant (warm-up then flat).",
        choices=("linear", "constant"),
    )
    warmup_ratio: float = opt(
        0.1, "Share of the schedule's steps spent warming up linearly from 0."
    )
    schedule_scope: str = opt(
        "run",
        "run: one schedule over all optimiser steps of the run; stage: the schedule restarts at "
        "every stage.",
        choices=("run", "stage"),
    )
    batch_size: int = opt(
        8,
        "Training micro-batch: examples (pairs for IRFT/SPIN) per micro-batch per process (demo: "
        "of every arm, whose optimiser step is one micro-batch).",
        minimum=1,
    )
    gradient_accumulation_steps: int = opt(
        1,
        "Micro-batches per optimiser step. Global batch = batch_size x this x processes.",
        minimum=1,
    )
    max_grad_norm: float = opt(
        1.0,
        "Clip the global gradient norm to this (0 = no clipping; the norm is still logged).",
        minimum=0,
    )
    mixed_precision: str = opt(
        "auto",
        "auto (bf16 on a GPU that supports it, else fp32), bf16, fp16 or no.",
        choices=("auto", "bf16", "fp16", "no"),
    )
    gradient_checkpointing: bool = opt(
        False, "Activation checkpointing: less memory, about 20% slower."
    )
    disable_dropout: bool = opt(
        True, "Set every dropout to 0, so the first step of a stage sees u = 0 exactly."
    )
    padding_free: str = opt(
        "auto",
        "Padding-free training forwards: the sequences of a micro-batch concatenated into one row "
        "with positions restarting per sequence (transformers masks attention within each), so no "
        "FLOPs go to padding; the reference log-probs take the same path. auto: on when training "
        "on a GPU with flash or flex attention and the model masks packed sequences (checked once "
        "on two sequences); off on the CPU and with sdpa or eager attention, whose dense mask over "
        "the packed row costs more than the padding saves; true (an error where the model does "
        "not mask them); false.",
        choices=("auto", "true", "false"),
    )
    micro_batch_size: str = opt(
        "auto",
        "How a process's share of each global batch is cut into micro-batches: fixed "
        "(`batch_size` items each), an integer (at most that many tokens each: packed tokens "
        "with padding_free, rows x longest row otherwise), or auto (on CUDA a token budget "
        "estimated once from the free memory and the model's shape; fixed elsewhere and under "
        "DeepSpeed, whose accumulation count is fixed). The global batch, and so each optimiser "
        "step, stays batch_size x gradient_accumulation_steps x processes items: only how its "
        "gradient is accumulated changes (equal up to float rounding).",
    )
    kernels: str = opt(
        "auto",
        "Fused training kernels: liger (liger-kernel's Triton RMSNorm, rotary embedding and "
        "SwiGLU patched into the model; extra demoalign[kernels]; CUDA only, an error elsewhere), "
        "none, or auto (liger when training on CUDA with liger-kernel installed, else none).",
        choices=("auto", "liger", "none"),
    )
    compile_training: str = opt(
        "auto",
        "torch.compile the policy's training forward (the forward every loss calls), with dynamic "
        "shapes so that micro-batches of new lengths do not recompile; saved weights and "
        "checkpoints keep the plain model's names. auto: off until a GPU measurement shows it "
        "pays (on the CPU the compile, about a minute of inductor code generation even for a "
        "tiny model on two cores, costs more than the whole run; the reference log-probs are "
        "taken uncompiled, so in bf16 u may differ from 0 at a stage's first step); true "
        "(anywhere; untested under DeepSpeed and FSDP, whose parameter gathering the graph would "
        "trace); false. Graph breaks and recompiles are reported once, in one line, after the "
        "first steps.",
        choices=("auto", "true", "false"),
    )

    def validate(self) -> None:
        for name in ("padding_free", "compile_training"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML's true/false arrive as "True"/"False"
                setattr(self, name, value.lower())
        super().validate()
        size = self.micro_batch_size
        if size not in ("auto", "fixed") and not (size.isdigit() and int(size) >= 1):
            raise ValueError(
                f"micro_batch_size={size!r}: expected auto, fixed or a token budget (an integer "
                ">= 1)"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


@options()
class LoRA(Options):
    """LoRA adapters instead of full fine-tuning."""

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

    def validate(self) -> None:
        super().validate()
        if self.lora_r < 0 or (self.lora_r and self.lora_alpha <= 0):
            raise ValueError("lora_r must be >= 0 and lora_alpha > 0")
        if self.lora_r and not self.lora_target_modules.strip(" ,"):
            raise ValueError("lora_target_modules is empty: all-linear or comma-separated names")


@options()
class Runtime(Options):
    """Seed and device."""

    seed: int = opt(
        0,
        "Seed of shuffling, chunking, sampling and initialisation (eval: of sampling and of the "
        "bootstrap).",
    )
    cpu: bool = opt(False, "Run on the CPU even when a GPU is present.")


@options()
class Sampling(Options):
    """How responses (negatives, rollouts, generations) are sampled."""

    max_new_tokens: int = opt(
        256,
        "Most tokens generated per response: per negative (IRFT/SPIN), per negative and per "
        "rollout (RFT), per prompt (generate, eval), per negative and per evaluation response "
        "(demo).",
        minimum=1,
    )
    temperature: float = opt(1.0, "Sampling temperature of negatives, rollouts and generations.")
    top_p: float = opt(1.0, "Nucleus sampling of negatives, rollouts and generations (1 = off).")

    def validate(self) -> None:
        super().validate()
        greedy = getattr(self, "greedy", False)  # RFT always samples: no greedy option
        if not greedy and self.temperature <= 0:
            can_be_greedy = "greedy" in {f.name for f in fields(self)}
            hint = " (set greedy=true for greedy decoding)" if can_be_greedy else ""
            raise ValueError(f"temperature must be > 0 when sampling{hint}")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@options()
class SamplingOrGreedy(Sampling):
    """Sampling, or greedy decoding."""

    greedy: bool = opt(
        False,
        "Greedy decoding instead of sampling (IRFT/SPIN: greedy negatives, not the paper's "
        "method; eval: greedy generations for reward-model scoring).",
    )


GENERATION_BACKEND_HELP = (
    "Generation engine: auto (static on CUDA, hf on CPU), hf (transformers generate with a "
    "dynamic cache, the training weights under autocast) or static (transformers static KV "
    "cache; on CUDA a compiled decode step on a bf16 copy of the weights, refreshed in place at "
    "every stage and freed during training)."
)


@options()
class Generation(Options):
    """The engine that generates, and its batches."""

    generation_backend: str = opt("auto", GENERATION_BACKEND_HELP, choices=GENERATION_BACKENDS)
    generation_batch_size: str = opt(
        "auto",
        "Prompts per generate() call: an integer, or auto (the largest batch that fits in free GPU "
        "memory; 16 on CPU). With auto on a GPU the batches, and so the samples of a seed, depend "
        "on the free memory: give an integer for samples that depend on the seed alone. "
        "IRFT/SPIN: also the batch of the reference forward (16 with auto). RFT: also sequences "
        "per scoring batch (16 with auto); with the static engine auto is measured once, at the "
        "first negatives, before either optimiser holds state, and rollouts run beside that "
        "state: on a GPU with little memory to spare, give an integer.",
    )

    def __post_init__(self):
        self.generation_batch_size = batch_size_text(self.generation_batch_size)

    def validate(self) -> None:
        super().validate()
        try:
            parse_batch_size(self.generation_batch_size)
        except ValueError:
            raise ValueError(
                f"generation_batch_size={self.generation_batch_size!r}: "
                "expected an integer >= 1 or auto"
            ) from None


PARK_HELP = (
    "While negatives and their reference log-probs are computed, move the optimiser's state "
    "(Adam's moments, RMSprop's averages) to host memory and back, so that generation's KV cache "
    "can use that GPU memory and generation's peak stays below training's: auto (on when training "
    "on a GPU, except under DeepSpeed, which owns its optimiser's memory), on, or off. Costs one "
    "copy of the state each way per stage (RFT: for its negatives, not for the rollouts of its "
    "policy steps). Training is unchanged; only with generation_backend=hf and an auto batch "
    "on a GPU can the freed memory make larger generation batches, and so other samples. With "
    "off on a GPU, generation_batch_size=auto is still sized at the first stage, before the "
    "optimiser holds any state: give an integer batch if memory is tight."
)


@options()
class GenerationEngine(Generation):
    """Generation between training steps: the engine, its batches, and the optimiser's state."""

    park_optimizer_state: str = opt("auto", PARK_HELP, choices=PARK_CHOICES)


@options()
class PairwiseLoss(Options):
    """The loss of IRFT/SPIN on (demonstration, negative) pairs."""

    beta: float = opt(
        0.1,
        "β. IRFT/SPIN (and the demo's SPIN/IRFT arms): of the implicit reward r = β log(π/π_ref). "
        "RFT: weight of the KL to the initial policy (the shaped reward is r − β (log π − log "
        "π_ref)).",
        above=0,
    )
    loss_type: str = opt(
        "sigmoid",
        "Pairwise loss: sigmoid (the paper's −log σ(u)), hinge max(0, 1−u), or linear −u.",
        choices=LOSS_TYPES,
    )
    sft_weight: float = opt(
        0.0,
        "Weight of an extra NLL term on the demonstrations (per-token mean; 0 = the paper's loss).",
        minimum=0,
    )
