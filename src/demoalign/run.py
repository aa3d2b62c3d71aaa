"""`demoalign.train(config)`: load, set up the one training loop, run the method, save."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .batching import Encoder
from .config import IRFTConfig, RFTConfig, SFTConfig, TrainConfig, config_to_dict
from .runio import MetricsLog, atomic_write_yaml, prepare_output_dir, save_pretrained_atomic
from .templates import resolve_template
from .trainer import Trainer, make_accelerator


def load_model_and_tokenizer(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no EOS token; responses must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from lengths, not from pad ids
    tokenizer.padding_side = "right"  # not saved by transformers 5; generation pads left by hand
    # fp32 master weights whatever the checkpoint's dtype (transformers 5 defaults to "auto"):
    # bf16 weights would lose updates at the paper's lr 5e-7; autocast does the bf16 compute.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def load_demonstrations(config: TrainConfig) -> tuple[list, str, dict]:
    """(examples, a summary to print, counts to log). `data=task:NAME[:SEED]` draws
    `max_examples` (default 1000) demonstrations of a built-in task."""
    from .data import load_examples, parse_columns

    if config.data.startswith("task:"):
        from .tasks import task_examples

        name, _, seed = config.data[len("task:"):].partition(":")
        examples = task_examples(name, config.max_examples or 1000, seed=int(seed or 0))
        return examples, f"built-in task {name!r} (data seed {seed or 0}): {len(examples)} demonstrations", {}
    examples, report = load_examples(config.data, parse_columns(config.columns or None), config.max_examples or None)
    counts = {"empty_responses_dropped": report.n_empty_responses, "duplicates_dropped": report.n_duplicates}
    return examples, report.summary(), counts


def train(config: TrainConfig, on_stage_end=None) -> Path:
    """Run SFT, SPIN, IRFT or RFT as `config` says; returns the run folder. `on_stage_end(model,
    stage)` is called on the main process after every IRFT stage (for evaluation over stages)."""
    config.validate()
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(out, config.overwrite)
        atomic_write_yaml(out / "config.yaml", config_to_dict(config))
    accelerator.wait_for_everyone()

    examples, summary, data_counts = load_demonstrations(config)
    if accelerator.is_main_process and config.show_progress:
        print(summary)
    model, tokenizer = load_model_and_tokenizer(config.model)
    template = resolve_template(tokenizer, config.template)
    encoder = Encoder(tokenizer, template, config.max_length, config.max_prompt_length)

    log = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process)
    log.write({"event": "run_start", "method": config.method, "template": template,
               "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
               "examples": len(examples), **data_counts})
    if isinstance(config, RFTConfig) and config.lora_r:
        from .rft import add_lora

        model = add_lora(model, config)
    trainer = Trainer(config, model, accelerator, log)
    started = time.perf_counter()
    try:
        if isinstance(config, IRFTConfig):
            from .methods import run_irft

            counts = run_irft(config, trainer, encoder, examples, out, on_stage_end)
        elif isinstance(config, RFTConfig):
            from .rft import run_rft

            counts = run_rft(config, trainer, encoder, examples, out, tokenizer)
        elif isinstance(config, SFTConfig):
            from .methods import run_sft

            counts = run_sft(config, trainer, encoder, examples)
        else:
            raise TypeError(f"no method for {type(config).__name__}")
        log.write({"event": "run_end", "steps": trainer.global_step, "wall_s": time.perf_counter() - started,
                   **counts})
    finally:
        log.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = trainer.unwrapped
        if hasattr(final, "merge_and_unload"):  # LoRA: save a plain model that AutoModelForCausalLM loads
            final = final.merge_and_unload()
        save_pretrained_atomic(final, tokenizer, out / "final")
    accelerator.wait_for_everyone()
    return out
