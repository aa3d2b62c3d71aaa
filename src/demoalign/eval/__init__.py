"""Evaluation: metrics (each defined once), stats (bootstrap, paired t-test), evaluate
(`demoalign eval`), report, reward_scoring, leaderboard (lm-evaluation-harness) and demo."""

from .evaluate import evaluate

__all__ = ["evaluate"]
