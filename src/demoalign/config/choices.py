"""The values options may take. They live here, at the bottom layer, so that a config is checked
without importing the modules that use them: losses, tracking and eval.leaderboard import their
lists from here; generation keeps its own copies of the backends and of parse_batch_size
(tests/test_config.py checks that they agree)."""

from __future__ import annotations

import importlib.util

GENERATION_BACKENDS = ("auto", "hf", "static")
LOSS_TYPES = ("sigmoid", "hinge", "linear")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARK_CHOICES = ("auto", "on", "off")
# tracker name: (module that must import, pip package that provides it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
LEADERBOARD_TASKS = (
    "arc_easy",
    "arc_challenge",
    "truthfulqa_mc2",
    "winogrande",
    "gsm8k",
    "hellaswag",
    "mmlu",
)
# Keys a resumed run's config may change from its config.yaml (runio.check_resume ignores them).
RESUME_MAY_DIFFER = ("resume", "show_progress", "overwrite", "report_to")


def parse_report_to(value: str) -> list[str]:
    """The trackers of `report_to` (`none`, a tracker, or a comma list); raises ValueError."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(
            f"report_to={value!r}: unknown tracker {unknown[0]!r}; choose none or a comma list "
            f"of {', '.join(TRACKERS)}"
        )
    return list(dict.fromkeys(names))


def check_trackers(value: str) -> list[str]:
    """parse_report_to, and every tracker's package importable: one clear error, before the run
    creates anything, instead of a failure once its folder exists."""
    names = parse_report_to(value)
    missing = [TRACKERS[n][1] for n in names if importlib.util.find_spec(TRACKERS[n][0]) is None]
    if missing:
        raise ValueError(
            f"report_to={value!r} needs the package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)} (TensorBoard also: pip install 'demoalign[tracking]')"
        )
    return names


def parse_leaderboard_tasks(spec: str) -> list[str]:
    """The tasks of `leaderboard` (`all` or a comma list); raises ValueError."""
    names = (
        list(LEADERBOARD_TASKS)
        if spec.strip() == "all"
        else [t.strip() for t in spec.split(",") if t.strip()]
    )
    unknown = [t for t in names if t not in LEADERBOARD_TASKS]
    if unknown:
        raise ValueError(
            f"unknown leaderboard task(s) {unknown}; choose from {', '.join(LEADERBOARD_TASKS)} "
            "or `all`"
        )
    return names


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


def batch_size_text(value):
    """A batch size option is `auto` or an integer; an int given from Python is kept as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value
