"""Run configuration: dataclasses are the one source of truth for every option, its default and
its documentation (`--help` and the README's reference are generated from them).

options.py: how an option is declared once; choices.py: the values options may take; groups.py:
the option groups; commands.py: each command's config, made of groups; loading.py: configs from
YAML and `key=value`. This package imports nothing of demoalign but demoalign.data."""

from .choices import (
    GENERATION_BACKENDS,
    LEADERBOARD_TASKS,
    LOSS_TYPES,
    RESUME_MAY_DIFFER,
    TRACKERS,
    parse_batch_size,
    parse_leaderboard_tasks,
    parse_report_to,
)
from .commands import (
    BEAVER_TEMPLATE,
    CONFIGS,
    DemoConfig,
    EvalConfig,
    GenerateConfig,
    IRFTConfig,
    RFTConfig,
    SFTConfig,
    SPINConfig,
    TrainConfig,
    parse_arm,
)
from .loading import build_config, config_to_dict, load_config, option_docs, parse_overrides
from .options import DECLARED, opt, options

__all__ = [
    "BEAVER_TEMPLATE",
    "CONFIGS",
    "DECLARED",
    "GENERATION_BACKENDS",
    "LEADERBOARD_TASKS",
    "LOSS_TYPES",
    "RESUME_MAY_DIFFER",
    "TRACKERS",
    "DemoConfig",
    "EvalConfig",
    "GenerateConfig",
    "IRFTConfig",
    "RFTConfig",
    "SFTConfig",
    "SPINConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
    "load_config",
    "opt",
    "option_docs",
    "options",
    "parse_arm",
    "parse_batch_size",
    "parse_leaderboard_tasks",
    "parse_overrides",
    "parse_report_to",
]
