"""`GenerationEngine`, the state generation keeps between calls, and `generate_ids`, the one
function through which everything in the package samples."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers import GenerationConfig, LogitsProcessorList

from ..models import eval_mode
from ..progress import progress_bar
from ..sharding import is_sharded
from .auto_batch import agreed_auto_size
from .batching import left_pad, length_batches, strip_after_eos
from .sampling import (
    DecodeLogps,
    SamplingOptions,
    Share,
    parse_batch_size,
    resolve_backend,
    sampling_config,
)
from .static import StaticEngine, architecture, wants_half_copy

CACHE_ROUNDING = 64  # static cache lengths are rounded up so stages of similar prompts share graphs


class GenerationEngine:
    """What generation keeps from one call to the next: per model its `StaticEngine` (on CUDA a
    bf16 copy refreshed in place and its compiled decode step, the `auto` batch size, the graph
    batch shapes), and at most one idle StaticEngine, whose model is done, waiting for the next
    model of the same architecture.

    Lifecycle: whoever runs creates it and closes it (`with GenerationEngine() as engine:`):
    `demoalign.train` (its own when it is given none), `demoalign eval` (one for every model it
    evaluates), `demoalign generate`. Whoever is done with a model tells the engine
    (`finish(model)`, `finish_all()` at the end of a run, or a `for_model(model)` block): its
    copy is released and parked as the idle one. A sweep keeps one engine for all its runs and
    passes it to each (`train(config, engine=engine)`): the next run's model adopts the parked
    copy and its compiled step, so the sweep compiles once per batch shape, not once per run.
    `close()` releases every copy and drops every compiled graph."""

    def __init__(self):
        self._active: dict[int, StaticEngine] = {}  # id(model) → its engine, which holds it
        self.idle: StaticEngine | None = None
        self.closed = False

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def static_engine(self, model) -> StaticEngine:
        """`model`'s StaticEngine: its own, else the idle one adopted (same architecture, bf16
        copy wanted), else a new one."""
        self.check_open()
        engine = self._active.get(id(model))
        if engine is None:
            half = wants_half_copy(model)
            engine = self._adopt_idle(model) if half else None
            engine = engine or StaticEngine(model, half=half)
            self._active[id(model)] = engine
        return engine

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this GenerationEngine is closed; create a new one")

    def _adopt_idle(self, model) -> StaticEngine | None:
        if self.idle is None or self.idle.architecture != architecture(model):
            return None
        engine, self.idle = self.idle, None
        engine.adopt(model)
        return engine

    def finish(self, model) -> None:
        """`model` generates no more here: its engine lets go of it, and a bf16 copy (with its
        compiled step) is parked as the idle one, replacing an earlier idle one. Generating from
        `model` again later is correct (it gets an engine again), only not free."""
        engine = self._active.pop(id(model), None)
        if engine is None:
            return
        if engine.half:
            engine.let_go()
            if self.idle is not None:
                self.idle.close()
            self.idle = engine
        else:  # the compiled step lives on the model itself: nothing outlives it
            engine.let_go()

    def finish_all(self) -> None:
        """Every model generated from so far is done (a run's end: its policy, or under
        sharding its gathered copy)."""
        for engine in list(self._active.values()):
            self.finish(engine.source)

    @contextmanager
    def for_model(self, model):
        """`finish(model)` at the end of the block."""
        try:
            yield self
        finally:
            self.finish(model)

    def close(self) -> None:
        """Release every copy and drop every compiled graph; the engine serves no more calls."""
        for engine in [*self._active.values(), *([self.idle] if self.idle else [])]:
            engine.close()
        self._active.clear()
        self.idle = None
        self.closed = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def generate_ids(
    engine: GenerationEngine,
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    options: SamplingOptions,
    share: Share = Share(),
    *,
    return_logps: bool = False,
):
    """Generate one response per prompt; returns {prompt index: generated ids} for the batches
    this process owns (`share`; all of them with one process). Each response ends at its first
    EOS (included) or after max_new_tokens.

    return_logps: also return {prompt index: [log π(token) per generated token]}, taken from the
    logits the tokens were sampled from, under the model's raw distribution (temperature 1, no
    top-p), so that they can stand in for a reference forward over the same tokens."""
    o = options
    sampling_config(tokenizer, o.max_new_tokens, o.temperature, o.top_p, o.greedy)  # checks
    device = next(model.parameters()).device
    static, target = _select_engine(engine, model, o.backend, device)
    # The recorder of log-probs owns temperature and top-p: it must see the raw logits.
    raw = (1.0, 1.0) if return_logps else (o.temperature, o.top_p)
    config = _engine_config(tokenizer, static, prompt_ids, o.max_new_tokens, *raw, o.greedy)
    size, padded = _batch_shape(static, target, o, prompt_ids, share.num_processes, device)
    batches = length_batches(prompt_ids, size)
    n = share.num_processes
    mine = [(b, idx) for b, idx in enumerate(batches) if b % n == share.process_index]
    sampling = (o.temperature, o.top_p, o.greedy, return_logps)
    call = _Call(static, target, config, sampling, tokenizer, padded)
    try:
        results, logps = _generate_mine(call, prompt_ids, mine, o.seed, share)
    finally:
        if static is not None:
            static.release()
    return (results, logps) if return_logps else results


def generate_responses(
    engine: GenerationEngine,
    model,
    tokenizer,
    encoder,
    prompts: list,
    config,
    show_progress: bool = False,
) -> list[dict]:
    """One response per Example of `prompts` with the training rendering (`encoder`) and the
    sampling options of `config` (`demoalign generate` and `demoalign eval`): records of prompt,
    earlier turns, response, tokens and whether it ended with EOS."""
    options = SamplingOptions(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        greedy=config.greedy,
        batch_size=config.generation_batch_size,
        backend=config.generation_backend,
        seed=config.seed,
    )
    prompt_ids = [encoder.prompt_ids(p) for p in prompts]
    out = generate_ids(
        engine, model, tokenizer, prompt_ids, options, Share(show_progress=show_progress)
    )
    eos = tokenizer.eos_token_id
    return [
        {
            "prompt": p.prompt,
            "history": [list(t) for t in p.history],
            "response": tokenizer.decode(out[i], skip_special_tokens=True),
            "tokens": len(out[i]),
            "finished": bool(out[i]) and out[i][-1] == eos,
        }
        for i, p in enumerate(prompts)
    ]


class _Call:
    """What every batch of one call shares."""

    def __init__(self, static, target, config, sampling, tokenizer, padded: int):
        self.static, self.target, self.config = static, target, config
        self.sampling, self.tokenizer, self.padded = sampling, tokenizer, padded
        # The half copy needs no autocast, and autocast would run it partly in fp32.
        self.autocast_off = static is not None and static.half


def _generate_mine(call: _Call, prompt_ids, mine, seed: int, share: Share):
    """This process's batches: ({prompt index: ids}, {prompt index: token log-probs})."""
    device = next(call.target.parameters()).device
    results: dict[int, list[int]] = {}
    logps: dict[int, list[float]] = {}
    total = sum(len(idx) for _, idx in mine)
    bar = progress_bar(share.desc, total=total, enabled=share.show_progress)
    with eval_mode(call.target), bar as advance:
        for b, idx in mine:
            rows = [prompt_ids[i] for i in idx]
            rows = rows + [rows[-1]] * max(0, call.padded - len(rows))  # one shape: one graph
            input_ids, attention = left_pad(rows, call.tokenizer.pad_token_id, device)
            out, row_logps = _generate_batch(call, input_ids, attention, seed * 1_000_003 + b)
            new = out[:, input_ids.shape[1] :]
            _collect(new, row_logps, idx, call.tokenizer.eos_token_id, results, logps)
            advance(len(idx))
    return results, logps


def _select_engine(engine: GenerationEngine, model, backend: str, device):
    """(the static engine or None, the model that generates: its bf16 copy, or `model`)."""
    engine.check_open()
    if is_sharded(model):
        # Each decode step would be a collective, and processes finish after different numbers
        # of steps: generation runs on the gathered copy of Trainer.inference_model instead.
        raise ValueError("cannot generate from sharded parameters; gather the model first")
    if resolve_backend(backend, device) != "static":
        return None, model
    static = engine.static_engine(model)
    static.refresh()
    return static, static.target()


def _engine_config(tokenizer, static, prompt_ids, max_new_tokens, temperature, top_p, greedy):
    config = sampling_config(tokenizer, max_new_tokens, temperature, top_p, greedy)
    if static is not None:
        # One cache length for every batch (and, rounded, for later calls): one decode graph.
        width = max((len(p) for p in prompt_ids), default=1)
        config.cache_implementation = "static"
        config.max_cache_len = -(-(width + max_new_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING
    return config


def _batch_shape(static, target, options: SamplingOptions, prompt_ids, num_processes, device):
    """(prompts per batch, rows per batch of a compiled graph or 0)."""
    # On CUDA `auto` fills the memory of one process; elsewhere it must not depend on the process
    # count, so that the samples do not either.
    n = len(prompt_ids)
    n_mine_max = -(-n // max(1, num_processes)) if device.type == "cuda" else n
    shared = num_processes > 1  # the processes split these prompts: they must agree on batches
    width = max((len(p) for p in prompt_ids), default=1)
    size = parse_batch_size(options.batch_size)
    if size is None:
        measure = (target, n_mine_max, width, options.max_new_tokens, shared)
        if static is None:
            size = agreed_auto_size(*measure)
        else:
            if static.auto_size is None:
                static.auto_size = agreed_auto_size(*measure)
            size = static.auto_size
        full, size = size, min(size, n_mine_max)
    else:
        full, size = size, min(size, max(1, n))  # not per process: see above
    padded = 0  # rows per batch only for a compiled graph: elsewhere padding rows would draw
    if static is not None and static.compile:  # random numbers and change the samples
        padded = static.graph_batch(size, margin=size < full)
    return size, padded


def _collect(new, row_logps, idx: list[int], eos_id: int, results: dict, logps: dict) -> None:
    """Each real row's ids up to its first EOS (and their log-probs) under its prompt index."""
    for row, i in enumerate(idx):
        ids = strip_after_eos(new[row].tolist(), eos_id)
        results[i] = ids
        if row_logps is not None:
            logps[i] = row_logps[row, : len(ids)].tolist()


def _generate_with_only(model, config: GenerationConfig, input_ids, attention, processors=None):
    """transformers fills every field left unset from `model.generation_config` (a checkpoint's
    repetition_penalty, min_p, …); a blank one in its place keeps the sampling exactly `config`."""
    inner = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # peft wraps the model
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=config,
            logits_processor=processors,
        )
    finally:
        inner.generation_config = saved


def _generate_batch(call: _Call, input_ids, attention, seed: int):
    """One `generate` call; a failed compile falls back to the uncompiled static cache once."""
    static, config = call.static, call.config
    temperature, top_p, greedy, return_logps = call.sampling
    while True:
        if static is not None:
            config.compile_config = static.compile_config
            config.disable_compile = not static.compile
        recorder = DecodeLogps(temperature, top_p, greedy) if return_logps else None
        processors = LogitsProcessorList([recorder]) if recorder is not None else None
        torch.manual_seed(seed)
        try:
            off = torch.autocast(input_ids.device.type, enabled=False)
            with off if call.autocast_off else nullcontext():
                out = _generate_with_only(call.target, config, input_ids, attention, processors)
        except Exception as error:  # compile errors come from dynamo, inductor and triton alike
            if (
                static is None
                or not static.compile
                or isinstance(error, torch.cuda.OutOfMemoryError)
            ):
                raise
            static.disable_compile(error)
            continue
        row_logps = recorder.finish(out[:, input_ids.shape[1] :]) if recorder is not None else None
        return out, row_logps
