"""RFT's reward model: a scalar head read at the last real token, its pairwise loss (the math
is `losses.reward_pair_loss`), its optimiser steps and its evaluation on pairs."""

from __future__ import annotations

import torch

from ..encoding import Tokenized
from ..losses import reward_pair_loss
from ..models import eval_mode
from ..pairs import Pair, collate_pairs, encode_preference, in_eval_batches
from ..trainer import Trainer, cyclic_batches, seeded_permutation


class RewardScorer(torch.nn.Module):
    """Wraps an AutoModelForSequenceClassification (num_labels=1): forward gives one scalar per
    row, the head applied to the trunk's hidden state at the LAST REAL token (right padding; the
    attention mask, not the pad id, finds it, so a pad id equal to EOS is harmless). The model is
    kept as `.lm`, the name Trainer.unwrapped reads."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model
        if not isinstance(getattr(model, "score", None), torch.nn.Linear):
            raise ValueError(
                f"{type(model).__name__} has no `score` head; the reward model must be an "
                "AutoModelForSequenceClassification with num_labels=1"
            )

    def forward(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        trunk = getattr(self.lm, self.lm.base_model_prefix)
        hidden = trunk(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        last = attention_mask.sum(-1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.lm.score(pooled).squeeze(-1).float()


def _scores(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    batch = collate_pairs(pairs, pad_id)
    scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return scores[: len(pairs)], scores[len(pairs) :]


def reward_loss_fn(loss_type: str, pad_id: int):
    """Per pair: logistic −log σ(r(y) − r(ỹ)), or linear −(r(y) − r(ỹ)), times the pair's weight.
    Statistics are split by kind (demonstration pairs vs preference pairs)."""

    def loss_fn(model, pairs: list[Pair]):
        chosen, rejected = _scores(model, pairs, pad_id)
        margin = chosen - rejected
        per_pair = reward_pair_loss(margin, loss_type)
        weights = torch.tensor([p.weight for p in pairs], device=margin.device)
        is_demo = torch.tensor(
            [p.kind == "demo" for p in pairs], device=margin.device, dtype=torch.float32
        )
        m = margin.detach()
        correct = (m > 0).float() + 0.5 * (m == 0).float()
        stats = {
            "demo_n": is_demo,
            "demo_correct": correct * is_demo,
            "demo_margin": m * is_demo,
            "demo_reward": chosen.detach() * is_demo,
            "negative_reward": rejected.detach() * is_demo,
            "pref_n": 1 - is_demo,
            "pref_correct": correct * (1 - is_demo),
            "pref_margin": m * (1 - is_demo),
        }
        return (
            per_pair * weights,
            stats,
            torch.tensor(float(sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs))),
        )

    return loss_fn


def _finish_reward_record(record: dict) -> dict:
    """Turn the per-kind sums of `reward_loss_fn` into means over their own kind."""
    out = {
        k: v for k, v in record.items() if not k.startswith(("demo_", "pref_", "negative_reward"))
    }
    for kind, keys in (("demo", ("correct", "margin", "reward")), ("pref", ("correct", "margin"))):
        n = record.get(f"{kind}_n", 0)
        if n > 0:
            for key in keys:
                name = {"correct": "accuracy"}.get(key, key)
                out[f"{'pair' if kind == 'demo' else 'preference'}_{name}"] = (
                    record[f"{kind}_{key}"] / n
                )
    if record.get("demo_n", 0) > 0:
        out["pair_reward_demo"] = out.pop("pair_reward")
        out["pair_reward_negative"] = record["negative_reward"] / record["demo_n"]
    return out


@torch.no_grad()
def pair_margins(scorer, pairs: list[Pair], pad_id: int, batch_size: int) -> list[float]:
    """r(chosen) − r(rejected) of each pair, in eval mode."""
    margins = []
    with eval_mode(scorer):
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = _scores(scorer, pairs[start : start + batch_size], pad_id)
            margins += (chosen - rejected).tolist()
    return margins


def margin_summary(margins: list[float]) -> dict:
    """Accuracy (ties ½) and mean margin of a reward model's margins on pairs."""
    if not margins:
        return {}
    return {
        "accuracy": sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "pairs": len(margins),
    }


def evaluate_reward_pairs(scorer, pairs: list[Pair], pad_id: int, batch_size: int) -> dict:
    """Accuracy (ties ½) and mean margin r(chosen) − r(rejected) of a reward model on pairs."""
    return margin_summary(pair_margins(scorer, pairs, pad_id, batch_size))


def score_rows(scorer, rows: list[Tokenized], pad_id: int, batch_size: int) -> list[float]:
    return in_eval_batches(
        scorer, rows, pad_id, batch_size, lambda m, b: m(b["input_ids"], b["attention_mask"])
    )


def reward_step(
    trainer: Trainer,
    pairs: list[Pair],
    preference: list[Pair],
    steps: int,
    loss_fn,
    seed_parts: tuple[int, ...],
    context: dict,
) -> list[dict]:
    """`steps` optimiser steps of the reward model, each on `global_batch` demonstration pairs plus
    as many preference pairs (when given). The loss is normalised by the demonstration pairs, so
    it is mean demo loss + w × mean preference loss; with w = 0 the preference pairs add exactly
    0."""
    demo_batches = cyclic_batches(pairs, trainer.global_batch, *seed_parts, 0)
    pref_batches = (
        cyclic_batches(preference, trainer.global_batch, *seed_parts, 1) if preference else None
    )
    records = []
    for _ in range(steps):
        demo = next(demo_batches)
        batch = demo + (next(pref_batches) if pref_batches else [])
        record = _finish_reward_record(trainer.step(batch, loss_fn, float(len(demo))))
        record.update(context)
        trainer.log.write(record)
        records.append(record)
    return records


def encode_preference_pairs(raw: list, encoder, config) -> tuple[list, list]:
    """(train, held-out) Pairs of real preference pairs, weighted by `preference_weight`;
    the held-out share is `heldout_fraction` (at least one pair when it is > 0)."""
    order = seeded_permutation(len(raw), config.seed, 1)
    n_eval = max(1, round(config.heldout_fraction * len(raw))) if config.heldout_fraction > 0 else 0
    train, held = [], []
    for rank, i in enumerate(order):
        weight = config.preference_weight
        pair = encode_preference(encoder, raw[i], True, weight=weight, kind="preference")
        (held if rank < n_eval else train).append(pair)
    return train, held


def heldout_ids(n_examples: int, fraction: float, seed: int) -> set[int]:
    """The demonstrations held out from the start: a seeded `fraction` of them."""
    n_held = round(fraction * n_examples) if fraction > 0 else 0
    return set(seeded_permutation(n_examples, seed, 2)[:n_held])


class HeldOutDemonstrations:
    """Demonstrations whose pairs evaluate the reward model and never train it, chosen once for
    the run by example: chunks may wrap around the data, and a demonstration trained on in one
    iteration is never held out in another."""

    def __init__(self, ids: set[int], trained: set[int]):
        """`ids`: the held-out examples (`heldout_ids`); `trained`: those trained on so far.
        Both are updated in place as iterations go (the run's state holds them)."""
        self.ids, self.trained = ids, trained

    def split(self, k: int, pairs: list, example_ids: list[int]) -> tuple[list, list]:
        """(train pairs, held-out pairs) of iteration k; each iteration holds out at least one
        never-trained example, so every iteration is evaluated."""
        if self.ids and not self.ids.intersection(example_ids):
            fresh = [e for e in example_ids if e not in self.trained]
            if fresh:
                self.ids.add(fresh[-1])
        is_held = [e in self.ids for e in example_ids]
        self.trained.update(e for e, h in zip(example_ids, is_held) if not h)
        held = [p for p, h in zip(pairs, is_held) if h]
        train = [p for p, h in zip(pairs, is_held) if not h]
        if not train:
            raise ValueError(
                f"iteration {k}: every demonstration is held out; lower heldout_fraction"
            )
        return train, held


def evaluate_subsets(margins_of, subsets: dict, prefix: str) -> dict:
    """`margin_summary` of each non-empty named subset, its margins from `margins_of(pairs)`:
    {prefix_subset_metric: value}."""
    return {
        f"{prefix}_{name}_{key}": value
        for name, subset in subsets.items()
        if subset
        for key, value in margin_summary(margins_of(subset)).items()
    }
