"""Progress bars (rich) that can be turned off for tests and non-main processes."""

from __future__ import annotations

from contextlib import contextmanager

from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging


@contextmanager
def progress_bar(desc: str, total: int, enabled: bool = True):
    """Yields `advance(n)`; a no-op when disabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(desc, total=total)
        yield lambda n=1: progress.update(task, advance=n)


def library_progress_bars(enabled: bool) -> None:
    """transformers' and huggingface_hub's own bars (weight loading, downloads) follow
    `show_progress` too, so show_progress=false leaves a clean log."""
    if enabled:
        logging.enable_progress_bar()
        enable_progress_bars()
    else:
        logging.disable_progress_bar()
        disable_progress_bars()
