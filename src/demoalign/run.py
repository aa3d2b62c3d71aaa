"""`demoalign.train(config)`: load, set up the one training loop, run the method, save."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .batching import Encoder
from .config import IRFTConfig, RFTConfig, SFTConfig, TrainConfig, config_to_dict
from .runio import (MetricsLog, atomic_write_yaml, check_output_dir, claim_output_dir, release_lock,
                    save_pretrained_atomic, write_run_state)
from .progress import library_progress_bars
from .templates import resolve_template
from .trainer import Trainer, make_accelerator


def _looks_local(path: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else, or a path whose first part exists
    here, is meant as a local folder (and must not fall through to a hub lookup that retries)."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        return True
    return Path(path.split("/")[0]).exists()


def check_model_path(path: str, what: str = "model") -> None:
    """A clear error for a model that cannot be a model folder, before anything is created."""
    local = Path(path).expanduser()
    if local.is_file():
        raise ValueError(f"{what}={path} is a file; expected a model folder "
                         "(config.json, weights and tokenizer files)")
    if local.is_dir() and not (local / "config.json").exists():
        raise ValueError(f"{what}={path} is a folder without config.json; not a model folder")
    if not local.exists() and _looks_local(path):
        raise ValueError(f"{what}={path}: no such model folder")


def load_model_and_tokenizer(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(path)
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


def run_inputs(config: TrainConfig) -> list[str]:
    """Paths this run reads: an overwrite must never delete them."""
    paths = [config.model, config.data, getattr(config, "reward_model", ""),
             getattr(config, "preference_data", "")]
    return [p for p in paths if p and not p.startswith("task:") and Path(p).expanduser().exists()]


def train(config: TrainConfig, on_stage_end=None) -> Path:
    """Run SFT, SPIN, IRFT or RFT as `config` says; returns the run folder. `on_stage_end(model,
    stage)` is called on the main process after every IRFT stage (for evaluation over stages).
    Every input is checked and loaded before the run folder is created or cleared."""
    config.validate()
    check_model_path(config.model)
    library_progress_bars(config.show_progress)
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    check_output_dir(config.output_dir, config.overwrite, run_inputs(config))
    accelerator.wait_for_everyone()  # every process checked before the main one clears

    examples, summary, data_counts = load_demonstrations(config)
    if accelerator.is_main_process and config.show_progress:
        print(summary)
    model, tokenizer = load_model_and_tokenizer(config.model)
    template = resolve_template(tokenizer, config.template)
    encoder = Encoder(tokenizer, template, config.max_length, config.max_prompt_length)

    out = Path(config.output_dir)
    if accelerator.is_main_process:
        claim_output_dir(out, config.overwrite, run_inputs(config))
        atomic_write_yaml(out / "config.yaml", config_to_dict(config))
        write_run_state(out, "running", method=config.method)
    accelerator.wait_for_everyone()
    log = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process)
    try:
        log.write({"event": "run_start", "method": config.method, "template": template,
                   "processes": accelerator.num_processes,
                   "mixed_precision": accelerator.mixed_precision,
                   "examples": len(examples), **data_counts})
        _train_and_save(config, model, tokenizer, encoder, examples, accelerator, log, on_stage_end)
    except BaseException as exc:
        if accelerator.is_main_process:
            write_run_state(out, "failed", method=config.method,
                            error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        log.close()
        if accelerator.is_main_process:
            release_lock(out)
    return out


def _run_method(config, trainer, encoder, examples, out, tokenizer, on_stage_end) -> dict:
    if isinstance(config, IRFTConfig):
        from .methods import run_irft

        return run_irft(config, trainer, encoder, examples, out, on_stage_end)
    if isinstance(config, RFTConfig):
        from .rft import run_rft

        return run_rft(config, trainer, encoder, examples, out, tokenizer)
    if isinstance(config, SFTConfig):
        from .methods import run_sft

        return run_sft(config, trainer, encoder, examples)
    raise TypeError(f"no method for {type(config).__name__}")


def _train_and_save(config, model, tokenizer, encoder, examples, accelerator, log, on_stage_end):
    """Train, then save final/; `run_end` and the finished state are written only once final/
    is complete, so a run killed during the save never looks finished."""
    out = Path(config.output_dir)
    if isinstance(config, RFTConfig) and config.lora_r:
        from .rft import add_lora

        model = add_lora(model, config)
    trainer = Trainer(config, model, accelerator, log)
    started = time.perf_counter()
    counts = _run_method(config, trainer, encoder, examples, out, tokenizer, on_stage_end)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = trainer.unwrapped
        if hasattr(final, "merge_and_unload"):  # LoRA: a plain model AutoModelForCausalLM loads
            final = final.merge_and_unload()
        save_pretrained_atomic(final, tokenizer, out / "final")
        log.write({"event": "run_end", "steps": trainer.global_step,
                   "wall_s": time.perf_counter() - started, **counts})
        write_run_state(out, "finished", method=config.method, steps=trainer.global_step)
    accelerator.wait_for_everyone()
