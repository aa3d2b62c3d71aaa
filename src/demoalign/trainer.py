"""ONE optimisation loop on `accelerate`, shared by every method.

A method hands the loop a list of items (examples or pairs), a loss function that returns the
PER-ITEM loss of a micro-batch, and a normaliser (how many units — pairs or tokens — the whole
global batch holds). Accumulation is written by hand rather than with `accelerator.accumulate`
because the loss must be divided by the units of the GLOBAL batch (all micro-batches, all
processes): only then do batch 1 × accumulation 8, batch 8 × 1 and 2 processes × 4 give the same
step, for per-token SFT losses as well as per-pair ones.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .compilation import CompileReport, compile_forward, use_compile
from .logprobs import SequenceScorer, padding_free_works
from .microbatch import micro_batch_tokens, split_by_tokens
from .parking import OptimizerParking, parking_enabled
from .progress import progress_bar
from .sharding import (
    GatheredCopy,
    full_state_dict,
    full_training_state,
    is_sharded,
    load_full_training_state,
)
from .tracking import accelerator_options

# (per-item losses, per-item statistics to log, tokens processed)
LossFn = Callable[
    [torch.nn.Module, list], tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]
]


def make_accelerator(config) -> Accelerator:
    precision = config.mixed_precision
    if precision == "auto":
        on_gpu = torch.cuda.is_available() and not config.cpu
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=config.cpu, mixed_precision=precision, **accelerator_options(config))


_DROPOUT_FIELDS = (
    "attention_dropout",
    "attn_dropout",
    "dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "activation_dropout",
    "classifier_dropout",
)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero dropout modules AND the float rates that attention code reads from its module or
    config (Llama's `attention_dropout`, OPT's `dropout`, …)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in _DROPOUT_FIELDS:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in _DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# Attention implementations that mask packed sequences without an N x N mask over the packed row
# (flash attention takes the sequence boundaries from the positions; flex attention builds a
# block-sparse mask). sdpa and eager get a dense block-diagonal mask: their attention then costs
# the square of the whole row: slower than padding (0.58x and 0.61x tokens/s in two CPU runs).
PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def use_padding_free(setting: str, model, device: torch.device) -> bool:
    """padding_free=true|false|auto: auto is on for CUDA training with an attention
    implementation in PACKED_ATTENTION where the model masks packed sequences (checked once,
    `padding_free_works`); off elsewhere (on the CPU the padded path's figures stay as they were).
    true on a model that does not mask them is an error, not a silently wrong loss."""
    setting = str(setting).lower()
    attention = getattr(model.config, "_attn_implementation", None)
    if setting == "false" or (
        setting == "auto" and (device.type != "cuda" or attention not in PACKED_ATTENTION)
    ):
        return False
    if padding_free_works(model):
        return True
    if setting == "true":
        raise ValueError(
            f"padding_free=true: {type(model).__name__} does not mask packed sequences (scored "
            "padded and packed, its log-probs differ); use padding_free=false or auto"
        )
    return False


@dataclass(frozen=True)
class Levers:
    """How the training forwards run, decided once per run: padding-free batches, the token
    budget of a micro-batch (None: `batch_size` items), and a compiled forward."""

    padding_free: bool = False
    micro_batch_tokens: int | None = None
    compile_training: bool = False


def training_levers(config, model, accelerator: Accelerator) -> Levers:
    """The levers `config` asks for, resolved for this model and device (auto's choices)."""
    device = accelerator.device
    padding_free = use_padding_free(getattr(config, "padding_free", "false"), model, device)
    tokens = None
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        checkpointing = getattr(config, "gradient_checkpointing", False)
        setting = getattr(config, "micro_batch_size", "fixed")
        tokens = micro_batch_tokens(setting, model, device, checkpointing)
    compiled = use_compile(getattr(config, "compile_training", "false"))
    return Levers(padding_free, tokens, compiled)


def lr_factor(num_steps: int, warmup_ratio: float, kind: str):
    """Multiplier of the peak lr at optimiser step k (0-based). Hand-written because transformers'
    warm-up schedules give step 0 an lr of exactly 0, which would waste the first step of every
    stage (the unbiased ML-IRL step) under schedule_scope=stage: here warm-up is (k+1)/(w+1),
    then linear decay ends at 1/(decay steps) on the last step, or stays at 1 (`constant`)."""
    warmup = int(warmup_ratio * num_steps)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        return max(num_steps - k, 1) / max(num_steps - warmup, 1)

    return factor


def steps_per_epoch(n_items: int, global_batch: int) -> int:
    return math.ceil(n_items / global_batch)


def seeded_permutation(n: int, *seed_parts: int) -> list[int]:
    generator = torch.Generator().manual_seed(hash(seed_parts) & 0x7FFF_FFFF_FFFF)
    return torch.randperm(n, generator=generator).tolist()


def iteration_chunks(n: int, iterations: int, per_iteration: int, seed: int) -> list[list[int]]:
    """Shuffle with the seed; iteration t takes the next `per_iteration` indices (the data split
    evenly over T when 0), wrapping around if T × per_iteration exceeds the data."""
    per = per_iteration or n // iterations
    if per < 1:
        raise ValueError(
            f"{n} examples cannot fill {iterations} outer iterations; lower `outer_iterations`"
        )
    order = seeded_permutation(n, seed, 0)
    return [[order[(t * per + i) % n] for i in range(per)] for t in range(iterations)]


def cyclic_batches(items: list, size: int, *seed_parts: int):
    """Endless batches of `size` items: seeded shuffled passes, one after another."""
    epoch = 0
    buffer: list = []
    while True:
        while len(buffer) < size:
            buffer += [items[i] for i in seeded_permutation(len(items), *seed_parts, epoch)]
            epoch += 1
        batch, buffer = buffer[:size], buffer[size:]
        yield batch


@dataclass
class FitPlan:
    """What one call of `Trainer.fit` runs: the per-item loss, the units that normalise it (pairs
    or tokens of the global batch), the shuffled passes, and what is called after every step."""

    loss_fn: LossFn
    units: Callable[[list], float]
    epochs: int
    seed_parts: tuple[int, ...]
    context: dict
    desc: str = "training"
    resume: bool = False  # continue from `Trainer.position`, restored from a checkpoint
    # Called after every logged step with `epoch_end` (the checkpoints' trigger, checkpoint.py).
    after_step: Callable[[bool], None] | None = None


class NonFiniteError(ValueError):
    """A loss or gradient that is NaN or infinite: training stops rather than corrupt weights."""


class Trainer:
    """Owns the accelerator, the prepared model, the optimiser and the schedule."""

    def __init__(
        self,
        config,
        model,
        accelerator: Accelerator,
        metrics_log,
        wrapper=SequenceScorer,
        levers: Levers | None = None,
    ):
        """`wrapper` turns the model into the module whose forward the loss functions call (it
        must keep the model as `.lm`): SequenceScorer for a causal LM (every method's policy),
        rft.RewardScorer for RFT's scalar reward model (always padded). `levers`: decided by the
        caller (the run, before its folder is claimed), or None to decide from `config` here."""
        self.config = config
        self.accelerator = accelerator
        self.log = metrics_log
        if config.disable_dropout:
            disable_dropout(model)
        if config.gradient_checkpointing:
            # transformers renamed it (the old name warns, and goes in v6); older 5.x lack the new.
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
            model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "adamw":
            optimizer = torch.optim.AdamW(
                params, lr=config.learning_rate, weight_decay=config.weight_decay
            )
        else:
            optimizer = torch.optim.RMSprop(
                params, lr=config.learning_rate, weight_decay=config.weight_decay
            )
        _fill_deepspeed_batch(accelerator, config)
        scorer = wrapper(model)
        if levers is None:  # a reward model is always scored padded, `batch_size` at a time
            policy = isinstance(scorer, SequenceScorer)
            levers = training_levers(config, model, accelerator) if policy else Levers()
        self.levers = levers
        if isinstance(scorer, SequenceScorer):
            scorer.padding_free = self.padding_free
        # Compiled in place: `unwrapped` and every state_dict stay the plain model's.
        self.compile_report = CompileReport() if levers.compile_training else None
        if levers.compile_training:
            compile_forward(scorer)
        # The scorer is what DDP wraps, so the one forward that yields log-probs is DDP's forward.
        self.model, self.optimizer = accelerator.prepare(scorer, optimizer)
        self.sharded = is_sharded(self.model)
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        park = getattr(config, "park_optimizer_state", "off")
        self.parking = (
            OptimizerParking(accelerator.device)
            if parking_enabled(park, accelerator.device, deepspeed)
            else None
        )
        self._gathered: GatheredCopy | None = None
        self.scheduler = None
        self.global_step = 0
        # Where `fit` is (epoch, steps done in it): saved with the trainer's checkpoint state, so
        # a resumed `fit` continues there.
        self.position = {"epoch": 0, "step": 0}

    @property
    def padding_free(self) -> bool:
        return self.levers.padding_free

    @property
    def global_batch(self) -> int:
        c = self.config
        return c.batch_size * c.gradient_accumulation_steps * self.accelerator.num_processes

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model).lm

    @contextmanager
    def inference_model(self):
        """The model generation and reference log-probs run on: the training model itself, or,
        when its parameters are shards (FSDP2, ZeRO-3), a plain copy gathered from every process
        in the forward's precision (sharding.GatheredCopy). Collective when sharded: every
        process enters it, and nothing inside may call a collective of the sharded model. The
        copy's weights are released on exit: whoever keeps a reference to it past the block (an
        `on_stage_end` callback) sees empty ones. With `park_optimizer_state`, the optimiser's
        state waits in host memory meanwhile (parking.py)."""
        with self._optimizer_parked():
            if not self.sharded:
                yield self.unwrapped
                return
            if self._gathered is None:
                self._gathered = GatheredCopy(self._forward_dtype())
            try:
                yield self._gathered.materialise(self.unwrapped)
            finally:
                self._gathered.release()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def parking_record(self) -> dict:
        """What the last `inference_model` block parked, for a stage's metrics record."""
        if self.parking is None:
            return {}
        return {
            "optimizer_state_parked_bytes": self.parking.bytes,
            "optimizer_parking_s": self.parking.seconds,
        }

    @contextmanager
    def _optimizer_parked(self):
        if self.parking is None or self.parking.parked:  # off, or inside an outer block
            yield
            return
        self.parking.park(self.optimizer)
        try:
            yield
        finally:
            self.parking.unpark()

    def _forward_dtype(self) -> torch.dtype:
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}
        return half.get(self.accelerator.mixed_precision, torch.float32)

    def final_state(self) -> dict | None:
        """The full weights for final/ when sharded (collective; on the main process only),
        else None: the unwrapped model saves itself."""
        return full_state_dict(self.unwrapped) if self.sharded else None

    def start_schedule(self, num_steps: int) -> None:
        """A warm-up + decay schedule over `num_steps` optimiser steps (the run or one stage)."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(num_steps, self.config.warmup_ratio, self.config.lr_scheduler)
        )

    def reset_optimizer(self) -> None:
        """A fresh optimiser: no moment estimates, the configured learning rate."""
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate
            group.pop("initial_lr", None)
        self.scheduler = None

    def checkpoint_state(self) -> dict:
        """Weights, optimiser, schedule and step: what a checkpoint holds of this trainer.
        Collective when sharded: full tensors (keyed by parameter name) on the main process."""
        if self.sharded:
            model, optimizer = full_training_state(self.model, self.optimizer)
        else:
            model, optimizer = self.unwrapped.state_dict(), self.optimizer.state_dict()
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "global_step": self.global_step,
            "position": dict(self.position),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Inverse of `checkpoint_state`, in place (the optimiser keeps its parameters). The
        schedule of the current stage must exist already; a per-stage schedule that is not
        started yet (a stage-boundary checkpoint) is started afresh by the next stage."""
        if self.sharded:
            load_full_training_state(self.model, self.optimizer, state)
        else:
            self.unwrapped.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = state["global_step"]
        self.position = dict(state["position"])

    def fit(self, items: list, plan: FitPlan) -> list[dict]:
        """`plan.epochs` shuffled passes over `items`; returns the metrics of every step. With
        `plan.resume` the steps already taken (`self.position`, from a checkpoint) are skipped:
        the order of every epoch is recomputed from the seed."""
        records = []
        per_epoch = steps_per_epoch(len(items), self.global_batch)
        first_epoch, skip = (
            (self.position["epoch"], self.position["step"]) if plan.resume else (0, 0)
        )
        show = self.config.show_progress and self.accelerator.is_main_process
        with progress_bar(plan.desc, total=plan.epochs * per_epoch, enabled=show) as advance:
            advance(first_epoch * per_epoch + skip)
            for epoch in range(first_epoch, plan.epochs):
                order = seeded_permutation(len(items), *plan.seed_parts, epoch)
                for i in range(skip if epoch == first_epoch else 0, per_epoch):
                    chunk = order[i * self.global_batch : (i + 1) * self.global_batch]
                    batch = [items[j] for j in chunk]
                    record = self.step(batch, plan.loss_fn, plan.units(batch))
                    record.update(plan.context, epoch=epoch)
                    self.log.write(record)
                    records.append(record)
                    advance(1)
                    self.position = {"epoch": epoch, "step": i + 1}
                    if plan.after_step is not None:
                        plan.after_step(i + 1 == per_epoch)
        self.report_compile(finished=True)
        return records

    def report_compile(self, finished: bool = False) -> None:
        """The compiled forward's graph breaks and recompiles, in one line on the main process,
        once: after the first few steps, or when `finished` (a fit or the run) comes earlier."""
        if self.compile_report is None:
            return
        line = self.compile_report.take_line(fit_ended=finished)
        if line is not None and self.accelerator.is_main_process:
            print(line, file=sys.stderr, flush=True)

    def _my_micro_batches(self, batch: list) -> tuple[list[list], float]:
        """This process's share of a global batch, in micro-batches. A process left without items
        (a short last batch) runs one item with weight 0 so that every process joins the
        gradient all-reduce."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine, weight = batch[rank::world], 1.0
        if not mine:
            mine, weight = batch[:1], 0.0
        budget = self.levers.micro_batch_tokens
        by_tokens = split_by_tokens(mine, budget, self.padding_free) if budget else None
        if by_tokens is not None:
            return by_tokens, weight
        size = self.config.batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)], weight

    def step(self, batch: list, loss_fn: LossFn, global_units: float) -> dict:
        """One optimiser step over a global batch; returns its metrics record."""
        if self.compile_report is None:
            return self._step(batch, loss_fn, global_units)
        with self.compile_report.watching():
            record = self._step(batch, loss_fn, global_units)
        self.report_compile()
        return record

    def _step(self, batch: list, loss_fn: LossFn, global_units: float) -> dict:
        acc = self.accelerator
        started = time.perf_counter()
        self.model.train()
        micro_batches, weight = self._my_micro_batches(batch)
        loss_sum = torch.zeros((), device=acc.device)
        stat_sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), device=acc.device)
        for i, micro in enumerate(micro_batches):
            sync = nullcontext() if i == len(micro_batches) - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    per_item, stats, n_tokens = loss_fn(self.model, micro)
                # DDP averages gradients over processes; × world turns that into a global sum.
                loss = per_item.sum() * weight * acc.num_processes / global_units
                acc.backward(loss)
            loss_sum += per_item.detach().float().sum() * weight
            tokens += n_tokens * weight
            for key, value in stats.items():
                stat_sums[key] = stat_sums.get(key, 0) + value.detach().float().sum() * weight
        clip = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
        # DeepSpeed has stepped inside backward and may not know the norm yet (None).
        grad_norm = None if grad_norm is None else float(grad_norm)
        # The norm is all-reduced, so every process stops at the same step, before the update.
        if grad_norm is not None and not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            # DeepSpeed steps inside backward: there the update has already happened.
            taken = acc.distributed_type == DistributedType.DEEPSPEED
            raise NonFiniteError(
                f"non-finite gradient (norm {grad_norm}) at optimiser step "
                f"{self.global_step + 1}; "
                + ("DeepSpeed has already applied it" if taken else "the model was not updated")
                + ". Lower the learning rate, enable clipping, or check the data of this step"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

        keys = sorted(stat_sums)
        totals = acc.reduce(
            torch.stack([loss_sum, tokens] + [stat_sums[k] for k in keys]), reduction="sum"
        )
        elapsed = time.perf_counter() - started
        record = {
            "step": self.global_step,
            "loss": totals[0].item() / global_units,
            "lr": lr,
            "grad_norm": grad_norm,
            "examples": len(batch),
            "tokens_per_s": totals[1].item() / elapsed,
        }
        record.update({k: totals[2 + j].item() / len(batch) for j, k in enumerate(keys)})
        return record


def _fill_deepspeed_batch(accelerator: Accelerator, config) -> None:
    """DeepSpeed's config needs the per-GPU micro-batch and the clipping, which accelerate fills
    from a prepared DataLoader; demoalign batches by hand and prepares none, so it fills them
    itself. Under DeepSpeed the clipping is DeepSpeed's (sharding.check_distributed_setup keeps
    a number given there equal to max_grad_norm)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
    if ds_config.get("gradient_clipping") == "auto":
        ds_config["gradient_clipping"] = config.max_grad_norm
