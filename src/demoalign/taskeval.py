"""Metrics of a model on a built-in task: reward of sampled and greedy generations, and
log-prob metrics on held-out (correct, plausible wrong) pairs (SPEC.md §5 definitions)."""

from __future__ import annotations

import torch

from .batching import Encoder
from .data import Example
from .generation import generate_ids
from .pairs import Pair, pair_logps


def generation_reward(model, encoder: Encoder, task, prompts: list[str], *, greedy: bool, seed: int,
                      max_new_tokens: int, batch_size: int = 64) -> list[float]:
    tok = encoder.tokenizer
    ids = [encoder.prompt_ids(Example(p, "")) for p in prompts]
    out = generate_ids(model, tok, ids, max_new_tokens=max_new_tokens, greedy=greedy, seed=seed,
                       batch_size=batch_size, show_progress=False)
    return [task.reward(p, tok.decode(out[i], skip_special_tokens=True)) for i, p in enumerate(prompts)]


@torch.no_grad()
def pair_sequence_logps(model, encoder: Encoder, pairs: list[tuple], batch_size: int = 64, fit: bool = False):
    """(log π(correct|x), log π(wrong|x)) per pair, with the training code's own scoring.

    A pair is (prompt, correct, wrong); the prompt is a string or an Example (which carries the
    earlier turns). fit=True cuts responses to the encoder's max_length as training does."""
    was_training = model.training
    model.eval()
    items = []
    for i, (prompt, good, bad) in enumerate(pairs):
        prompt_ids = encoder.prompt_ids(prompt if isinstance(prompt, Example) else Example(prompt, good))
        good_ids, bad_ids = encoder.response_ids(good), encoder.response_ids(bad)
        if fit:
            good_ids = encoder.fit(prompt_ids, good_ids).response_ids
            bad_ids = encoder.fit(prompt_ids, bad_ids).response_ids
        items.append(Pair(i, prompt_ids, good_ids, bad_ids))
    good_lp, bad_lp = [], []
    pad = encoder.tokenizer.pad_token_id
    for start in range(0, len(items), batch_size):
        g, b, _, _ = pair_logps(model, items[start : start + batch_size], pad)
        good_lp += g.tolist()
        bad_lp += b.tolist()
    model.train(was_training)
    return good_lp, bad_lp


def _win(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def pair_metrics(good: list[float], bad: list[float], ref_good: list[float], ref_bad: list[float]) -> dict:
    """Log-prob gap, reference-free win rate, and implicit-reward accuracy against a reference
    (the sign of β[(good − ref_good) − (bad − ref_bad)] does not depend on β > 0). Ties count ½."""
    n = len(good)
    return {
        "logp_gap": sum(g - b for g, b in zip(good, bad)) / n,
        "pair_win_rate": sum(_win(g, b) for g, b in zip(good, bad)) / n,
        "implicit_reward_accuracy": sum(
            _win(g - rg, b - rb) for g, b, rg, rb in zip(good, bad, ref_good, ref_bad)
        ) / n,
    }
