"""Generation: ONE function, `generate_ids`, through which everything in the package samples.

Two backends behind it, both transformers' own `generate` (same sampling code, same processors):

- `hf`: dynamic KV cache, the model as it is (fp32 master weights under the caller's autocast).
- `static`: transformers' static KV cache; on CUDA the decode step is compiled by transformers
  (`torch.compile`, CUDA graphs by default) and runs on a half-precision inference copy of the
  model, refreshed in place from the training weights at every call and freed between calls.
- `auto`: `static` on CUDA, `hf` elsewhere (on CPU the static cache brings nothing).

Prompts are sorted by length and grouped into batches (less padding); each batch is generated with
a seed derived from (seed, batch index), and batches are dealt round-robin to processes, so the
samples do not depend on how many processes share the work. `generate` stops a batch as soon as
every row has produced EOS.

Compile cost is paid once per run: the compiled decode step lives on the inference copy
(transformers keeps it as `_compiled_call`), the copy is kept per training model in `_ENGINES`,
and its weights are refreshed with `copy_` into the same tensors, so the compiled graph stays
valid. Between calls the copy's storage is released (resized to 0 bytes, tensors kept), so
training never holds it. When a training model goes away its copy waits (released) for the next
model of the same architecture in the process, so a sweep of runs compiles once.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import weakref

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from .models import eval_mode
from .progress import progress_bar
from .sharding import is_sharded

BACKENDS = ("auto", "hf", "static")
DEFAULT_BATCH_SIZE = 16  # `auto` off CUDA: today's default, which the CPU demo is tuned for
MAX_AUTO_BATCH = 512  # past this a decode step is compute-bound: bigger batches gain nothing
CACHE_ROUNDING = 64  # static cache lengths are rounded up so stages of similar prompts share graphs


def sampling_config(
    tokenizer, max_new_tokens: int, temperature: float, top_p: float, greedy: bool
) -> GenerationConfig:
    """Pure sampling at `temperature` and `top_p` (top-k off), or greedy decoding."""
    common = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    if temperature <= 0:
        raise ValueError(
            "temperature must be > 0 when sampling; set greedy=true for greedy decoding"
        )
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)


def parse_batch_size(value) -> int | None:
    """An int >= 1, or None for `auto`; accepts the strings a config file or `key=value` gives."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch size {value!r}: expected a positive integer or `auto`") from None
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise ValueError(f"batch size {value!r}: expected a positive integer or `auto`")
    return size


def forward_batch_size(value) -> int:
    """Sequences per scoring forward for a `generation_batch_size` setting (16 for `auto`)."""
    return parse_batch_size(value) or DEFAULT_BATCH_SIZE


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "static" if device.type == "cuda" else "hf"
    return backend


class _DecodeLogps(LogitsProcessor):
    """Records log π(token) under the model's raw distribution (temperature 1, no top-p) of every
    sampled token, then applies the sampling warpers itself. It must see the logits before any
    warper: that is why the generation config it runs with has none, and it owns them."""

    def __init__(self, temperature: float, top_p: float, greedy: bool):
        self.warpers = []
        if not greedy:
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        self.steps: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self.last is not None:  # input_ids now ends with the token chosen from `self.last`
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, generated] log-probs of `new_tokens`, the generated part of the output."""
        if self.last is not None:
            self.steps.append(self.last.gather(-1, new_tokens[:, -1:]).squeeze(-1))
        return torch.stack(self.steps, dim=1)


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


def _left_pad(
    batch: list[list[int]], pad_id: int, device, width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(width, max(len(ids) for ids in batch))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def _strip_after_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to and including the first EOS (padding after it removed)."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids


def length_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- the static engine


def _half_copy(model, dtype: torch.dtype):
    """A copy of `model` whose parameters are `dtype` and never need grad. Built by deepcopy with
    the parameters pre-mapped, so no full-precision copy ever exists; tied weights stay tied and
    buffers (rotary frequencies) keep their precision."""
    memo = {
        id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for p in model.parameters()
    }
    clone = copy.deepcopy(model, memo)
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        clone.__dict__.pop(attr, None)
    return clone.eval()


class StaticEngine:
    """Per training model: the model generation runs on (a half-precision copy on CUDA when the
    training weights are fp32, else the model itself), the batch size chosen once, and whether
    compilation works here. The copy's tensors are kept across calls, their storage is not."""

    def __init__(self, model, half: bool | None = None):
        """half: generate on a bf16 copy; None = where it pays (`wants_half_copy`)."""
        self.source = weakref.ref(model)
        self.architecture = architecture(model)
        device = next(model.parameters()).device
        self.half = wants_half_copy(model) if half is None else half
        old_gpu = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        dtype = torch.float16 if old_gpu else torch.bfloat16
        self.model = _half_copy(model, dtype) if self.half else None
        self._bytes = (
            [p.untyped_storage().nbytes() for p in self.model.parameters()] if self.half else []
        )
        self.released = False
        self.auto_size: int | None = None  # `auto` is measured once per run, at the first call
        self.graph_sizes: set[int] = set()
        mode = os.environ.get("DEMOALIGN_COMPILE_MODE", "reduce-overhead")
        self.compile = device.type == "cuda" and mode != "off"
        self.compile_config = None
        if self.compile:
            from transformers import CompileConfig

            self.compile_config = CompileConfig(mode=mode)

    def target(self):
        return self.model if self.half else self.source()

    @torch.no_grad()
    def refresh(self) -> None:
        """Stage start: the copy takes the current training weights, in the same tensors."""
        if not self.half:
            return
        for dst, src, nbytes in zip(
            self.model.parameters(), self.source().parameters(), self._bytes
        ):
            if self.released:
                dst.untyped_storage().resize_(nbytes)
            dst.copy_(src.detach())
        self.released = False

    def release(self) -> None:
        """Frees the copy's weights (the tensor objects, and so the compiled graph, stay)."""
        if not self.half or self.released:
            return
        for p in self.model.parameters():
            p.untyped_storage().resize_(0)
        self.released = True

    def graph_batch(self, size: int, margin: bool) -> int:
        """The batch shape to pad `size` rows to. Each shape is a compile, and the per-stage prompt
        counts of a run differ by one: a shape that holds all of a call's prompts (`margin`) gets
        room for a few more, and close sizes share a shape."""
        for shape in sorted(self.graph_sizes):
            if size <= shape <= size * 1.25 + 16:
                return shape
        shape = -(-size // 16) * 16 + 16 if margin and size > 8 else size
        self.graph_sizes.add(shape)
        return shape

    def disable_compile(self, error: Exception) -> None:
        first_line = str(error).splitlines()[0] if str(error) else ""
        print(
            "demoalign: torch.compile of the static-cache decode step failed "
            f"({type(error).__name__}: {first_line}); generating with the static cache "
            "uncompiled from now on",
            file=sys.stderr,
            flush=True,
        )
        self.compile = False
        self.compile_config = None

    def adopt(self, model) -> None:
        """Serve `model` (of this engine's architecture) from now on: its weights are copied in
        at the next refresh, into the same tensors, so the compiled decode step stays valid."""
        self.source = weakref.ref(model)
        self.auto_size = None  # the new run's prompts, lengths and memory may differ
        if self.model is not None:
            # transformers never makes a static cache shorter than the copy's last one: the new
            # run's would be sized by the old run's lengths, not by what `auto` measures.
            self.model.__dict__.pop("_previous_max_cache_length", None)


def wants_half_copy(model) -> bool:
    """Where a bf16 copy pays: fp32 weights on CUDA (a peft model generates as it is)."""
    param = next(model.parameters())
    peft = hasattr(model, "get_base_model")
    return param.device.type == "cuda" and param.dtype == torch.float32 and not peft


def architecture(model) -> tuple:
    """What must be equal for a copy (and its compiled graph) made for one model to serve
    another: class, device, configuration (not where it was loaded from), generation defaults and
    every parameter's name, shape and dtype."""
    generation = getattr(model, "generation_config", None)
    where_from = ("_name_or_path", "_commit_hash", "transformers_version")
    config = {k: v for k, v in model.config.to_dict().items() if k not in where_from}
    return (
        type(model),
        next(model.parameters()).device,
        repr(sorted(config.items())),
        repr(sorted(generation.to_dict().items())) if generation is not None else "",
        tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()),
    )


_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, StaticEngine] = weakref.WeakKeyDictionary()
# The engine (weights released) of the last training model that went away, kept for the next
# model of the same architecture in this process: a sweep of runs (several arms and seeds, or
# `demoalign eval` over several models) then compiles its decode step once, not once per model.
_IDLE: list[StaticEngine] = []


def drop_idle_engine() -> None:
    """Let the waiting engine go (its compiled graphs hold some GPU memory of their own): for a
    process that generates no more, or moves on to other models."""
    _IDLE.clear()


def _keep_idle(engine: StaticEngine) -> None:
    engine.release()
    _IDLE[:] = [engine]


def static_engine(model) -> StaticEngine:
    engine = _ENGINES.get(model)
    if engine is None:
        if not _IDLE and wants_half_copy(model):
            # A finished run's model sits in reference cycles: collected, it hands its engine
            # over (about to build and compile a new one, a collection costs nothing in comparison).
            gc.collect()
        engine = _reusable_engine(model) or StaticEngine(model)
        _ENGINES[model] = engine
        if engine.half:  # only a separate copy outlives its model
            weakref.finalize(model, _keep_idle, engine).atexit = False
    return engine


def _reusable_engine(model) -> StaticEngine | None:
    if not _IDLE or not wants_half_copy(model) or _IDLE[0].architecture != architecture(model):
        return None
    engine = _IDLE.pop()
    engine.adopt(model)
    return engine


def auto_batch_size(model, n_prompts: int, prompt_width: int, max_new_tokens: int) -> int:
    """The largest batch whose KV cache, logits and prefill activations fit in 85% of the free
    GPU memory (torch's cached-but-unused blocks count as free); 16 off CUDA."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return min(DEFAULT_BATCH_SIZE, max(1, n_prompts))
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    elem = param.element_size()
    cache_len = prompt_width + max_new_tokens
    per_row = 2 * cfg.num_hidden_layers * kv_heads * head_dim * cache_len * elem
    per_row += 8 * cfg.vocab_size * 4  # fp32 logits of a step, softmax/warper copies, log-softmax
    intermediate = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    per_row += prompt_width * (6 * cfg.hidden_size + 3 * intermediate) * elem  # prefill activations
    free, _ = torch.cuda.mem_get_info(param.device)
    free += torch.cuda.memory_reserved(param.device) - torch.cuda.memory_allocated(param.device)
    fits = int(0.85 * free // per_row)
    size = max(1, min(fits, n_prompts, MAX_AUTO_BATCH))
    return size - size % 8 if size > 8 else size


# ---------------------------------------------------------------- the one entry point


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    desc: str = "generating",
    show_progress: bool = True,
    backend: str = "hf",
    return_logps: bool = False,
):
    """Generate one response per prompt; returns {prompt index: generated ids} for the batches
    this process owns (all of them with one process).

    batch_size: prompts per `generate` call, or `auto` (the largest that fits on CUDA, 16 else).
    return_logps: also return {prompt index: [log π(token) per generated token]}, taken from the
    logits the tokens were sampled from, under the model's raw distribution (temperature 1, no
    top-p), so that they can stand in for a reference forward over the same tokens."""
    sampling_config(tokenizer, max_new_tokens, temperature, top_p, greedy)  # checks the values
    device = next(model.parameters()).device
    engine, target = _select_engine(model, backend, device)
    # The recorder of log-probs owns temperature and top-p: it must see the raw logits.
    raw = (1.0, 1.0) if return_logps else (temperature, top_p)
    config = _engine_config(tokenizer, engine, prompt_ids, max_new_tokens, *raw, greedy)
    size, padded = _batch_shape(
        engine, target, batch_size, prompt_ids, max_new_tokens, num_processes, device
    )
    batches = length_batches(prompt_ids, size)
    mine = [(b, idx) for b, idx in enumerate(batches) if b % num_processes == process_index]
    sampling = (temperature, top_p, greedy, return_logps)
    try:
        results, logps = _generate_mine(
            engine,
            target,
            config,
            prompt_ids,
            mine,
            padded,
            seed,
            sampling,
            tokenizer,
            desc,
            show_progress,
        )
    finally:
        if engine is not None:
            engine.release()
    return (results, logps) if return_logps else results


def generate_responses(
    model, tokenizer, encoder, prompts: list, config, show_progress: bool = False
) -> list[dict]:
    """One response per Example of `prompts` with the training rendering (`encoder`) and the
    sampling options of `config` (`demoalign generate` and `demoalign eval`): records of prompt,
    earlier turns, response, tokens and whether it ended with EOS."""
    out = generate_ids(
        model,
        tokenizer,
        [encoder.prompt_ids(p) for p in prompts],
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        greedy=config.greedy,
        batch_size=config.generation_batch_size,
        seed=config.seed,
        show_progress=show_progress,
        backend=config.generation_backend,
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


def _generate_mine(
    engine, target, config, prompt_ids, mine, padded, seed, sampling, tokenizer, desc, show_progress
):
    """This process's batches: ({prompt index: ids}, {prompt index: token log-probs})."""
    device = next(target.parameters()).device
    results: dict[int, list[int]] = {}
    logps: dict[int, list[float]] = {}
    # The half copy needs no autocast, and autocast would run it partly in fp32.
    autocast_off = engine is not None and engine.half
    total = sum(len(idx) for _, idx in mine)
    with eval_mode(target), progress_bar(desc, total=total, enabled=show_progress) as advance:
        for b, idx in mine:
            rows = [prompt_ids[i] for i in idx]
            rows = rows + [rows[-1]] * max(0, padded - len(rows))  # one shape: one graph
            input_ids, attention = _left_pad(rows, tokenizer.pad_token_id, device)
            out, row_logps = _generate_batch(
                engine,
                target,
                config,
                input_ids,
                attention,
                seed * 1_000_003 + b,
                *sampling,
                autocast_off,
            )
            _collect(out[:, input_ids.shape[1] :], row_logps, idx, tokenizer, results, logps)
            advance(len(idx))
    return results, logps


def _select_engine(model, backend: str, device):
    """(the static engine or None, the model that generates: its bf16 copy, or `model`)."""
    if is_sharded(model):
        # Each decode step would be a collective, and processes finish after different numbers
        # of steps: generation runs on the gathered copy of Trainer.inference_model instead.
        raise ValueError("cannot generate from sharded parameters; gather the model first")
    backend = resolve_backend(backend, device)
    engine = static_engine(model) if backend == "static" else None
    if engine is None:
        return None, model
    engine.refresh()
    return engine, engine.target()


def _engine_config(tokenizer, engine, prompt_ids, max_new_tokens, temperature, top_p, greedy):
    config = sampling_config(tokenizer, max_new_tokens, temperature, top_p, greedy)
    if engine is not None:
        # One cache length for every batch (and, rounded, for later calls): one decode graph.
        width = max((len(p) for p in prompt_ids), default=1)
        config.cache_implementation = "static"
        config.max_cache_len = -(-(width + max_new_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING
    return config


def _batch_shape(engine, target, batch_size, prompt_ids, max_new_tokens, num_processes, device):
    """(prompts per batch, rows per batch of a compiled graph or 0)."""
    # On CUDA `auto` fills the memory of one process; elsewhere it must not depend on the process
    # count, so that the samples do not either.
    n = len(prompt_ids)
    n_mine_max = -(-n // max(1, num_processes)) if device.type == "cuda" else n
    shared = num_processes > 1  # the processes split these prompts: they must agree on batches
    width = max((len(p) for p in prompt_ids), default=1)
    size = parse_batch_size(batch_size)
    if size is None:
        if engine is not None and engine.auto_size is None:
            engine.auto_size = _agreed_auto_size(target, n_mine_max, width, max_new_tokens, shared)
        size = (
            engine.auto_size
            if engine is not None
            else _agreed_auto_size(target, n_mine_max, width, max_new_tokens, shared)
        )
        full, size = size, min(size, n_mine_max)
    else:
        full, size = size, min(size, max(1, n))  # not per process: see above
    padded = 0  # rows per batch only for a compiled graph: elsewhere padding rows would draw
    if engine is not None and engine.compile:  # random numbers and change the samples
        padded = engine.graph_batch(size, margin=size < full)
    return size, padded


def check_one_each(indices: list[int], n: int, what: str) -> None:
    """After processes gathered their shares: exactly one sample per prompt, or the processes
    disagreed on the batches (the pairs would silently be wrong)."""
    if indices != list(range(n)):
        raise RuntimeError(
            f"the processes' {what} do not cover the {n} prompts once each "
            f"({len(indices)} gathered): the processes cut the prompts into different batches"
        )


def _agreed_auto_size(target, n_prompts: int, width: int, max_new_tokens: int, shared: bool) -> int:
    """`auto_batch_size`; when processes split the prompts (`shared`: every one of them is here)
    the smallest over them, since batches are dealt out by index, so every process must cut the
    prompts into the same batches (each one's free memory differs)."""
    size = auto_batch_size(target, n_prompts, width, max_new_tokens)
    dist = torch.distributed
    if shared and dist.is_available() and dist.is_initialized():
        device = next(target.parameters()).device
        agreed = torch.tensor([size], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        size = int(agreed.item())
    return size


def _collect(new, row_logps, idx: list[int], tokenizer, results: dict, logps: dict) -> None:
    """Each real row's ids up to its first EOS (and their log-probs) under its prompt index."""
    for row, i in enumerate(idx):
        ids = _strip_after_eos(new[row].tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id)
        results[i] = ids
        if row_logps is not None:
            logps[i] = row_logps[row, : len(ids)].tolist()


def _generate_batch(
    engine,
    model,
    config,
    input_ids,
    attention,
    seed,
    temperature,
    top_p,
    greedy,
    return_logps,
    autocast_off,
):
    """One `generate` call; a failed compile falls back to the uncompiled static cache once."""
    while True:
        if engine is not None:
            config.compile_config = engine.compile_config
            config.disable_compile = not engine.compile
        recorder = _DecodeLogps(temperature, top_p, greedy) if return_logps else None
        processors = LogitsProcessorList([recorder]) if recorder is not None else None
        torch.manual_seed(seed)
        try:
            if autocast_off:
                with torch.autocast(input_ids.device.type, enabled=False):
                    out = _generate_with_only(model, config, input_ids, attention, processors)
            else:
                out = _generate_with_only(model, config, input_ids, attention, processors)
        except Exception as error:  # compile errors come from dynamo, inductor and triton alike
            if (
                engine is None
                or not engine.compile
                or isinstance(error, torch.cuda.OutOfMemoryError)
            ):
                raise
            engine.disable_compile(error)
            continue
        row_logps = recorder.finish(out[:, input_ids.shape[1] :]) if recorder is not None else None
        return out, row_logps
