"""Every metric, defined once (docs/algorithms.md): per-item values whose mean is the metric.

- preference pairs (x, y_w, y_l): `logp_gap` = log π(y_w|x) − log π(y_l|x); `pair_win_rate` =
  [log π(y_w|x) > log π(y_l|x)] (reference-free); `implicit_reward_accuracy` =
  [(log π(y_w) − log π_ref(y_w)) > (log π(y_l) − log π_ref(y_l))] (the sign of β·(…) does not
  depend on β > 0). Ties count ½. Log-probs are the training code's own (`pairs.pair_logps`).
- built-in task: exact match of sampled and greedy generations (`generation_reward`).
- reward model: `reward_score` = R(x, y); `win_rate_vs_baseline` = [R(x, y) > R(x, y_base)].
"""

from __future__ import annotations

import torch

from ..data import Example, Preference
from ..encoding import Encoder
from ..generation import QUIET, GenerationEngine, SamplingOptions, generate_ids
from ..models import eval_mode
from ..pairs import encode_preference, pair_logps

DEFINITIONS = {
    "logp_gap": "mean of log π(chosen|x) − log π(rejected|x)",
    "pair_win_rate": (
        "share of pairs with log π(chosen|x) > log π(rejected|x) (reference-free; ties ½)"
    ),
    "implicit_reward_accuracy": (
        "share of pairs with log π/π_ref(chosen) > log π/π_ref(rejected) (ties ½)"
    ),
    "task_exact_match_sampled": (
        "share of held-out task prompts answered exactly right, sampled (temperature 1)"
    ),
    "task_exact_match_greedy": "share of held-out task prompts answered exactly right, greedy",
    "reward_score": "mean reward-model score of one generation per prompt",
    "win_rate_vs_baseline": "share of prompts where R(x, y_model) > R(x, y_baseline) (ties ½)",
}


def win(x: float, y: float) -> float:
    """1 if x > y, ½ on a tie, else 0."""
    return 1.0 if x > y else 0.5 if x == y else 0.0


def pair_values(good: list[float], bad: list[float], ref_good=None, ref_bad=None) -> dict:
    """Per-pair values of the pair metrics (the implicit-reward accuracy only with a reference)."""
    out = {
        "logp_gap": [g - b for g, b in zip(good, bad)],
        "pair_win_rate": [win(g, b) for g, b in zip(good, bad)],
    }
    if ref_good is not None:
        out["implicit_reward_accuracy"] = [
            win(g - rg, b - rb) for g, b, rg, rb in zip(good, bad, ref_good, ref_bad)
        ]
    return out


def pair_metrics(good: list[float], bad: list[float], ref_good=None, ref_bad=None) -> dict:
    """The means of `pair_values`."""
    return {k: sum(v) / len(v) for k, v in pair_values(good, bad, ref_good, ref_bad).items()}


def win_values(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """1 where the model's score beats the baseline's on the same prompt, ½ on a tie, else 0."""
    if len(scores) != len(baseline_scores):
        raise ValueError("win rate needs one score per prompt for both models")
    return [win(a, b) for a, b in zip(scores, baseline_scores)]


def task_sampling(
    max_new_tokens: int, greedy: bool, seed: int, batch_size: int | str = 64, backend: str = "auto"
) -> SamplingOptions:
    """How the built-in task's exact match samples: temperature 1 (or greedy), no top-p."""
    return SamplingOptions(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        batch_size=batch_size,
        backend=backend,
        seed=seed,
    )


def generation_reward(
    engine: GenerationEngine,
    model,
    encoder: Encoder,
    task,
    prompts: list[str],
    options: SamplingOptions,
) -> list[float]:
    """The task's reward of one response per prompt, sampled from `model` through `engine`."""
    tok = encoder.tokenizer
    ids = [encoder.prompt_ids(Example(p, "")) for p in prompts]
    out = generate_ids(engine, model, tok, ids, options, QUIET)
    return [
        task.reward(p, tok.decode(out[i], skip_special_tokens=True)) for i, p in enumerate(prompts)
    ]


@torch.no_grad()
def pair_sequence_logps(
    model, encoder: Encoder, pairs: list[Preference], batch_size: int = 64, fit: bool = False
):
    """(log π(chosen|x), log π(rejected|x)) per pair, with the training code's own scoring;
    fit=True cuts responses to the encoder's max_length as training does."""
    items = [encode_preference(encoder, pair, fit) for pair in pairs]
    good_lp, bad_lp = [], []
    pad = encoder.tokenizer.pad_token_id
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            g, b, _, _ = pair_logps(model, items[start : start + batch_size], pad)
            good_lp += g.tolist()
            bad_lp += b.tolist()
    return good_lp, bad_lp
