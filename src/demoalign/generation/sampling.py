"""What a generation call samples: the options (`SamplingOptions`), how the call's prompts are
shared between processes and shown (`Share`), and the checks and transformers configuration
they turn into."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from ..config.choices import GENERATION_BACKENDS, parse_batch_size

# The choices and the parsing of a batch-size setting belong to the configs that validate them.
BACKENDS = GENERATION_BACKENDS
DEFAULT_BATCH_SIZE = 16  # `auto` off CUDA: today's default, which the CPU demo is tuned for


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample one response per prompt.

    batch_size: prompts per `generate` call, or `auto` (the largest that fits on CUDA, 16 else).
    backend: `hf`, `static` or `auto` (see the package docstring). seed: the samples depend on it
    and on the prompts only (not on the batch size's split over processes)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    batch_size: int | str = DEFAULT_BATCH_SIZE
    backend: str = "hf"
    seed: int = 0


@dataclass(frozen=True)
class Share:
    """This process's part of a call (the batches with index ≡ process_index mod num_processes)
    and how its progress shows."""

    process_index: int = 0
    num_processes: int = 1
    desc: str = "generating"
    show_progress: bool = True

    @classmethod
    def of(cls, accelerator, desc: str, show_progress: bool) -> Share:
        """The share of `accelerator`'s process; progress shown by the main process only."""
        return cls(
            accelerator.process_index,
            accelerator.num_processes,
            desc,
            show_progress and accelerator.is_main_process,
        )


QUIET = Share(show_progress=False)


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


def forward_batch_size(value) -> int:
    """Sequences per scoring forward for a `generation_batch_size` setting (16 for `auto`)."""
    return parse_batch_size(value) or DEFAULT_BATCH_SIZE


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "static" if device.type == "cuda" else "hf"
    return backend


class DecodeLogps(LogitsProcessor):
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
