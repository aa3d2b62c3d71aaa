"""`demoalign.train(config)`: check every input, take the run folder, run the method, save."""

from __future__ import annotations

import json
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from accelerate.utils import broadcast_object_list, set_seed

from .checkpoint import STATE_FILE, Checkpoints, clean_leftovers, latest_checkpoint
from .config import TrainConfig, config_to_dict
from .data.sources import demonstrations
from .encoding import Encoder
from .generation import GenerationEngine
from .kernels import apply_liger, use_liger
from .lora import add_lora
from .methods import method_of
from .methods.context import RunContext
from .modelcard import policy_card, read_records
from .models import check_model_path, load_model_and_tokenizer
from .progress import library_progress_bars
from .runio import (
    MARKER,
    MetricsLog,
    RunFolderError,
    atomic_write_yaml,
    check_output_dir,
    check_resume,
    claim_output_dir,
    live_lock_owner,
    read_run_state,
    release_lock,
    save_pretrained_atomic,
    write_run_state,
)
from .sharding import check_distributed_setup, plain_model, sharding_of
from .templates import resolve_template
from .tracking import start_trackers
from .trainer import Levers, Trainer, make_accelerator, training_levers


@dataclass
class RunParts:
    """What `train` has checked and loaded before the run folder is claimed."""

    config: TrainConfig
    model: object
    encoder: Encoder
    examples: list
    accelerator: object
    log: MetricsLog
    engine: GenerationEngine
    levers: Levers


def run_inputs(config: TrainConfig) -> list[str]:
    """Paths this run reads: an overwrite must never delete them."""
    paths = [
        config.model,
        config.data,
        getattr(config, "reward_model", ""),
        getattr(config, "preference_data", ""),
    ]
    return [p for p in paths if p and not p.startswith("task:") and Path(p).expanduser().exists()]


def _resume_point(config: TrainConfig) -> tuple[Path | None, Path | None]:
    """(the run folder to continue, its newest complete checkpoint) for resume=true; (None, None)
    when there is nothing to resume. Checks the folder and config; changes nothing."""
    if not config.resume:
        return None, None
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    folder = check_resume(config.output_dir, config_to_dict(config), defaults=defaults)
    return folder, (latest_checkpoint(folder) if folder is not None else None)


def _start_point(config: TrainConfig) -> tuple[Path | None, Path | None, bool]:
    """(the run folder to continue, its checkpoint, whether that run is finished) after checking
    that the output folder may be used; changes nothing."""
    folder, checkpoint = _resume_point(config)
    if folder is not None and (read_run_state(folder) or {}).get("state") == "finished":
        return folder, checkpoint, True
    if checkpoint is None:
        if not (config.resume or config.overwrite):
            _refuse_to_restart_an_unfinished_run(Path(config.output_dir))
        overwrite = config.overwrite or folder is not None
        check_output_dir(Path(config.output_dir), overwrite, run_inputs(config))
    return folder, checkpoint, False


def unfinished_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of an unfinished (interrupted or failed) run in
    `output_dir`; None when the folder holds no such run."""
    out = Path(output_dir)
    if not (out / MARKER).exists() or (read_run_state(out) or {}).get("state") == "finished":
        return None
    return latest_checkpoint(out)


def _refuse_to_restart_an_unfinished_run(out: Path) -> None:
    """Without resume or overwrite, an interrupted run's folder points at resume=true, before
    the generic "not empty" error could lead to overwrite=true and lose its checkpoints."""
    checkpoint = unfinished_checkpoint(out)
    if checkpoint is None or live_lock_owner(out):
        return
    raise RunFolderError(
        f"{out} holds an unfinished run with checkpoint {checkpoint.name}; pass resume=true to "
        "continue it (same settings), overwrite=true to start it again (its checkpoints are "
        "deleted), or choose another output_dir"
    )


def decided_by_main(accelerator, decide):
    """`decide()` run on the main process; its result for every process, or its error raised on
    every process (as the same exception type where that type takes a message)."""
    if accelerator.num_processes == 1:
        return decide()
    box: list = [None, None]
    own_error = None
    if accelerator.is_main_process:
        try:
            box[0] = decide()
        except Exception as exc:  # every process must learn it, or they wait for the main one
            own_error, box[1] = exc, (type(exc), str(exc))
    broadcast_object_list(box)
    if own_error is not None:
        raise own_error
    if box[1] is not None:
        kind, message = box[1]
        try:
            error = kind(message)
        except Exception:
            error = RuntimeError(message)
        raise error
    return box[0]


def _claim(config: TrainConfig, folder: Path | None, checkpoint: Path | None, main: bool) -> None:
    """Take the run folder: a resumed run keeps it (only an interrupted save's leftovers go);
    otherwise it is created or cleared (resume=true with no checkpoint yet restarts the run)."""
    out = Path(config.output_dir)
    if main and checkpoint is not None:
        claim_output_dir(out, False, run_inputs(config), resume=True)
        removed = clean_leftovers(out)
        if config.show_progress:
            cleaned = f"; removed leftovers {', '.join(removed)}" if removed else ""
            print(f"resuming {out} from checkpoint {checkpoint.name}{cleaned}")
    elif main:
        claim_output_dir(out, config.overwrite or folder is not None, run_inputs(config))
        atomic_write_yaml(out / "config.yaml", config_to_dict(config))
    if main:
        resumed = {"resumed_from": checkpoint.name} if checkpoint is not None else {}
        write_run_state(out, "running", method=config.method, **resumed)


def train(config: TrainConfig, on_stage_end=None, engine: GenerationEngine | None = None) -> Path:
    """Run SFT, SPIN, IRFT or RFT as `config` says; returns the run folder. `on_stage_end(model,
    stage)` is called on the main process after every IRFT stage (for evaluation over stages).
    Every input is checked and loaded before the run folder is created or cleared. With
    resume=true the run continues from the folder's last checkpoint (checkpoint.py).

    engine: the GenerationEngine negatives and rollouts are sampled through. None: the run
    creates one and closes it at its end. A sweep passes one engine to every run: at its end a
    run tells the engine it is done with its models (`finish_all`), and the next run's model of
    the same architecture takes over the bf16 copy and its compiled decode step."""
    if engine is None:
        with GenerationEngine() as own:
            return train(config, on_stage_end, own)
    config.validate()
    check_model_path(config.model)
    if getattr(config, "reward_model", ""):  # RFT's start; looked at before the folder is taken
        check_model_path(config.reward_model, "reward_model")
    library_progress_bars(config.show_progress)
    accelerator = make_accelerator(config)
    check_distributed_setup(config, accelerator)
    set_seed(config.seed)
    out = Path(config.output_dir)
    # The main process alone looks at the folder and decides (its lock, its checkpoints); every
    # process gets its decision or its error, so processes on machines that see the folder late,
    # or differently, neither start another way nor wait forever for one that stopped.
    folder, checkpoint, finished = decided_by_main(accelerator, lambda: _start_point(config))
    if finished:
        if accelerator.is_main_process and config.show_progress:
            print(f"{out} holds a finished run (final/ is complete); nothing to resume")
        return out

    examples, data_counts = _read_demonstrations(config, accelerator)
    method_of(config).load().check(config, len(examples))  # e.g. too few examples for T stages
    model, tokenizer, kernels, levers = _load_policy(config, accelerator)
    template = resolve_template(tokenizer, config.template)
    encoder = Encoder(tokenizer, template, config.max_length, config.max_prompt_length)

    _claim(config, folder, checkpoint, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log = _open_log(config, checkpoint, accelerator)
    try:
        start = _start_record(config, checkpoint, template, accelerator, examples, data_counts)
        chosen = {**asdict(levers), "kernels": kernels}
        log.write({**start, **chosen} if checkpoint is None else start)
        parts = RunParts(config, model, encoder, examples, accelerator, log, engine, levers)
        _train_and_save(parts, checkpoint, on_stage_end)
    except BaseException as exc:
        if accelerator.is_main_process:
            write_run_state(
                out, "failed", method=config.method, error=f"{type(exc).__name__}: {exc}"
            )
        raise
    finally:
        engine.finish_all()
        log.close()
        if accelerator.is_main_process:
            release_lock(out)
    return out


def _read_demonstrations(config, accelerator) -> tuple[list, dict]:
    """The demonstrations and their counts (the summary printed on the main process)."""
    examples, summary, data_counts = demonstrations(
        config.data,
        config.columns,
        config.max_examples,
        data_split=config.data_split,
        data_config=config.data_config,
        data_revision=config.data_revision,
    )
    if accelerator.is_main_process and config.show_progress:
        print(summary)
    return examples, data_counts


def _load_policy(config, accelerator) -> tuple:
    """(the policy, its tokenizer, its kernels: liger or none, the training levers). Fused
    kernels go in before LoRA wraps the linear layers they call; unknown LoRA target modules and
    a padding_free=true the model cannot take fail here, before the folder is claimed."""
    model, tokenizer = load_model_and_tokenizer(config.model)
    kernels = "liger" if use_liger(config.kernels, accelerator.device) else "none"
    if kernels == "liger":
        apply_liger(model)
    if config.lora_r:
        model = add_lora(model, config)
    return model, tokenizer, kernels, training_levers(config, model, accelerator)


def _start_record(config, checkpoint, template, accelerator, examples, data_counts) -> dict:
    if checkpoint is not None:
        return {"event": "resume", "checkpoint": checkpoint.name}
    return {
        "event": "run_start",
        "method": config.method,
        "template": template,
        "processes": accelerator.num_processes,
        "sharding": sharding_of(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "examples": len(examples),
        **data_counts,
    }


def _open_log(config, checkpoint: Path | None, accelerator) -> MetricsLog:
    """metrics.jsonl (cut back to the checkpoint's length on resume), and the trackers of
    `report_to`, which get every record it gets (tracking.py)."""
    resume_at = None
    if checkpoint is not None:
        resume_at = json.loads((checkpoint / STATE_FILE).read_text())["metrics_bytes"]
    sink = start_trackers(accelerator, config, config_to_dict(config))
    path = Path(config.output_dir) / "metrics.jsonl"
    return MetricsLog(path, accelerator.is_main_process, resume_at, sink=sink)


def _checkpoints(config, out: Path, accelerator, log, resume_from) -> Checkpoints:
    if not config.keep_checkpoints:
        return Checkpoints.disabled()
    return Checkpoints(config, out, accelerator, log, resume_from=resume_from)


def _train_and_save(parts: RunParts, resume_from: Path | None, on_stage_end=None) -> None:
    """Run the method, then save final/; `run_end` and the finished state are written only once
    final/ is complete, so a run killed during the save never looks finished."""
    config, accelerator, log = parts.config, parts.accelerator, parts.log
    out = Path(config.output_dir)
    method = method_of(config).load()
    trainer = Trainer(config, parts.model, accelerator, log, levers=parts.levers)
    ckpt = _checkpoints(config, out, accelerator, log, resume_from)
    ckpt.register("policy", trainer)
    state = method.State()
    ckpt.track(state)  # loaded from the checkpoint when resuming
    data = (parts.encoder, parts.examples)
    ctx = RunContext(config, trainer, *data, out, ckpt, state, parts.engine, on_stage_end)
    started = time.perf_counter()
    counts = method.run(ctx)
    trainer.report_compile(finished=True)  # a run of fewer steps than the report waits for
    accelerator.wait_for_everyone()
    final = trainer.final_state()  # sharded: gathered by every process, held by the main one
    if accelerator.is_main_process:
        end = {
            "event": "run_end",
            "steps": trainer.global_step,
            "sharded_parameters": trainer.sharded,
            "wall_s": time.perf_counter() - started,  # the training, without the final save
            **counts,
        }
        card = policy_card(config_to_dict(config), read_records(out / "metrics.jsonl"), end)
        _save_final(config, trainer.unwrapped, parts.encoder.tokenizer, out, final, card)
        log.write(end)
        write_run_state(out, "finished", method=config.method, steps=trainer.global_step)
    accelerator.wait_for_everyone()


def _save_final(config, model, tokenizer, out: Path, state=None, card: str | None = None) -> None:
    """final/: a plain model AutoModelForCausalLM loads (LoRA merged into the base); with
    lora_keep_adapters the adapters alone (peft's format) go to final_adapters/ first, since
    merging changes the base weights in place. `state`: the gathered weights of a sharded
    model, saved through a plain model of the same architecture."""
    if state is not None:
        model = plain_model(model, state)
    if hasattr(model, "merge_and_unload"):
        if config.lora_keep_adapters:
            save_pretrained_atomic(model, tokenizer, out / "final_adapters")
        model = model.merge_and_unload()
    save_pretrained_atomic(model, tokenizer, out / "final", card=card)
