"""Compiled training forwards (`compile_training`): the policy's SequenceScorer, whose forward
every loss calls, runs its transformer through a torch.compile'd call of its own. Nothing is
wrapped in another module, so the scorer, its `lm` and their state_dict keep their own parameter
names (checkpoints and final/ never see an `_orig_mod.` prefix), and the reference log-probs and
generation, which call the same `lm` through other scorers or directly, stay uncompiled.

Graph breaks and recompiles are counted over the training steps alone (torch's counters are
process-wide: a compiled decode step of generation would otherwise mix in) and reported ONCE,
after the first few steps (`CompileReport`)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch._dynamo.utils import counters, get_compilation_metrics

# torch.compile's backend. Tests set "eager" or "aot_eager": the same graph capture (and so the
# same graph breaks and recompiles) without the minutes of code generation on a small CPU.
BACKEND = "inductor"
# Optimiser steps after which the one report is made (or earlier, at the end of a `fit`).
REPORT_AFTER_STEPS = 3


def use_compile(setting: str) -> bool:
    """compile_training=auto|true|false: only true compiles (wherever it is asked, the CPU too).
    auto stays off until a GPU measurement shows that the compiled forward pays: on the CPU it
    costs more than a run gains, and the reference log-probs, taken by the uncompiled model, could
    then differ from the compiled training forward's by bf16 rounding (u exactly 0 at a stage's
    first step holds only when both take the same path)."""
    return str(setting).lower() == "true"


def compile_forward(scorer: torch.nn.Module) -> None:
    """Compile the training forward of `scorer`, with dynamic shapes: micro-batches of mixed
    lengths share one graph instead of a recompile per new length. A SequenceScorer gets its
    model call compiled (`call_model`: the transformer, whose shapes depend only on the batch's);
    its choice of scored positions (`nonzero`, boolean masks: shapes that depend on the data)
    stays outside (inside, it would break the graph and recompile at every new count of response
    tokens). Any other wrapper is compiled whole, in place."""
    if hasattr(scorer, "call_model"):
        scorer.call_model = torch.compile(scorer.call_model, backend=BACKEND, dynamic=True)
    else:
        scorer.compile(backend=BACKEND, dynamic=True)


class CompileReport:
    """Graph breaks and recompiles of the compiled training forward, counted step by step
    (`watching`), reported in one line (`take_line`) once."""

    def __init__(self) -> None:
        self.graph_breaks: Counter[str] = Counter()
        self.recompiles: Counter[str] = Counter()
        self.steps = 0
        self.reported = False

    @contextmanager
    def watching(self):
        """Count what compiling inside the block adds (one training step's forwards and
        backwards)."""
        breaks_before = Counter(counters["graph_break"])
        metrics_before = get_compilation_metrics()
        yield
        self.graph_breaks += Counter(counters["graph_break"]) - breaks_before
        for metrics in _new_entries(metrics_before, get_compilation_metrics()):
            if metrics.recompile_reason:
                self.recompiles[f"{metrics.co_name}: {_first_line(metrics.recompile_reason)}"] += 1
        self.steps += 1

    def take_line(self, fit_ended: bool = False) -> str | None:
        """The report, the first time it is due (after REPORT_AFTER_STEPS steps, or at the end of
        a fit or a run that had fewer, but some); None otherwise and ever after."""
        due = self.steps >= REPORT_AFTER_STEPS or (fit_ended and self.steps > 0)
        if self.reported or not due:
            return None
        self.reported = True
        return self.line()

    def line(self) -> str:
        breaks, recompiles = sum(self.graph_breaks.values()), sum(self.recompiles.values())
        text = (
            f"demoalign: compile_training: {_plural(breaks, 'graph break')} and "
            f"{_plural(recompiles, 'recompile')} in the first "
            f"{_plural(self.steps, 'training step')}"
        )
        if breaks:
            text += "; graph breaks: " + _counted(self.graph_breaks, _graph_break_reason)
        if recompiles:
            text += "; recompiles: " + _counted(self.recompiles, str)
        return text


def _new_entries(before: list, after: list) -> list:
    """The entries of `after` (a snapshot of a bounded log) that came after `before`'s last."""
    if not before:
        return after
    last = before[-1]
    for i in range(len(after) - 1, -1, -1):
        if after[i] is last:
            return after[i + 1 :]
    return after  # the log dropped `last`: everything in it is new


def _first_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "unknown"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _graph_break_reason(reason: str) -> str:
    """torch's reason names the kind of break on its first line and explains it on the next."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    head = lines[0] if lines else "unknown"
    if len(lines) > 1 and lines[1].startswith("Explanation:"):
        head += f" ({lines[1].removeprefix('Explanation:').strip()})"
    return _first_line(head)


def _counted(reasons: Counter, short) -> str:
    return ", ".join(f"{n} x {short(reason)}" for reason, n in reasons.most_common())


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
