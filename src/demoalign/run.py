"""`demoalign.train(config)`: check every input, take the run folder, run the method, save."""

from __future__ import annotations

import time
from pathlib import Path

from accelerate.utils import set_seed

from .config import IRFTConfig, RFTConfig, SFTConfig, TrainConfig, config_to_dict
from .data.sources import demonstrations
from .encoding import Encoder
from .lora import add_lora
from .methods import run_irft, run_rft, run_sft
from .models import check_model_path, load_model_and_tokenizer
from .progress import library_progress_bars
from .runio import (
    MetricsLog,
    atomic_write_yaml,
    check_output_dir,
    claim_output_dir,
    release_lock,
    save_pretrained_atomic,
    write_run_state,
)
from .templates import resolve_template
from .trainer import Trainer, make_accelerator


def run_inputs(config: TrainConfig) -> list[str]:
    """Paths this run reads: an overwrite must never delete them."""
    paths = [
        config.model,
        config.data,
        getattr(config, "reward_model", ""),
        getattr(config, "preference_data", ""),
    ]
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

    examples, summary, data_counts = demonstrations(
        config.data, config.columns, config.max_examples
    )
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
        log.write(
            {
                "event": "run_start",
                "method": config.method,
                "template": template,
                "processes": accelerator.num_processes,
                "mixed_precision": accelerator.mixed_precision,
                "examples": len(examples),
                **data_counts,
            }
        )
        _train_and_save(config, model, tokenizer, encoder, examples, accelerator, log, on_stage_end)
    except BaseException as exc:
        if accelerator.is_main_process:
            write_run_state(
                out, "failed", method=config.method, error=f"{type(exc).__name__}: {exc}"
            )
        raise
    finally:
        log.close()
        if accelerator.is_main_process:
            release_lock(out)
    return out


def _run_method(config, trainer, encoder, examples, out, on_stage_end) -> dict:
    if isinstance(config, IRFTConfig):
        return run_irft(config, trainer, encoder, examples, out, on_stage_end)
    if isinstance(config, RFTConfig):
        return run_rft(config, trainer, encoder, examples, out)
    if isinstance(config, SFTConfig):
        return run_sft(config, trainer, encoder, examples)
    raise TypeError(f"no method for {type(config).__name__}")


def _train_and_save(config, model, tokenizer, encoder, examples, accelerator, log, on_stage_end):
    """Train, then save final/; `run_end` and the finished state are written only once final/
    is complete, so a run killed during the save never looks finished."""
    out = Path(config.output_dir)
    if isinstance(config, RFTConfig) and config.lora_r:
        model = add_lora(model, config)
    trainer = Trainer(config, model, accelerator, log)
    started = time.perf_counter()
    counts = _run_method(config, trainer, encoder, examples, out, on_stage_end)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = trainer.unwrapped
        if hasattr(final, "merge_and_unload"):  # LoRA: a plain model AutoModelForCausalLM loads
            final = final.merge_and_unload()
        save_pretrained_atomic(final, tokenizer, out / "final")
        log.write(
            {
                "event": "run_end",
                "steps": trainer.global_step,
                "wall_s": time.perf_counter() - started,
                **counts,
            }
        )
        write_run_state(out, "finished", method=config.method, steps=trainer.global_step)
    accelerator.wait_for_everyone()
