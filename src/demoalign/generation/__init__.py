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

Compile cost is paid once per engine, not per call: the compiled decode step lives on the
inference copy (transformers keeps it as `_compiled_call`), the copy is kept per model by the
`GenerationEngine` the caller passes, and its weights are refreshed with `copy_` into the same
tensors, so the compiled graph stays valid. Between calls the copy's storage is released (resized
to 0 bytes, tensors kept), so training never holds it. Nothing is kept at module level: the run
(or eval, or `demoalign generate`) creates the engine and closes it; a sweep keeps one engine for
all its runs, and a finished model's copy serves the next model of the same architecture.

Modules: sampling (options, checks, the log-prob recorder), batching (length batches, padding,
EOS), static (the per-model static-cache state), auto_batch (`batch_size=auto`), engine
(`GenerationEngine`, `generate_ids`, `generate_responses`).
"""

from .auto_batch import MAX_AUTO_BATCH, auto_batch_size
from .batching import check_one_each, left_pad, length_batches, strip_after_eos
from .engine import CACHE_ROUNDING, GenerationEngine, generate_ids, generate_responses
from .sampling import (
    BACKENDS,
    DEFAULT_BATCH_SIZE,
    QUIET,
    SamplingOptions,
    Share,
    forward_batch_size,
    parse_batch_size,
    resolve_backend,
    sampling_config,
)
from .static import StaticEngine, architecture, half_copy, wants_half_copy

__all__ = [
    "BACKENDS",
    "CACHE_ROUNDING",
    "DEFAULT_BATCH_SIZE",
    "MAX_AUTO_BATCH",
    "QUIET",
    "GenerationEngine",
    "SamplingOptions",
    "Share",
    "StaticEngine",
    "architecture",
    "auto_batch_size",
    "check_one_each",
    "forward_batch_size",
    "generate_ids",
    "generate_responses",
    "half_copy",
    "left_pad",
    "length_batches",
    "parse_batch_size",
    "resolve_backend",
    "sampling_config",
    "strip_after_eos",
    "wants_half_copy",
]
