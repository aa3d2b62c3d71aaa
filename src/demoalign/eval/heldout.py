"""Per-item metrics of a chat model on held-out data: preference pairs (implicit-reward accuracy
against a reference, log-prob gap, pair win rate), the per-token NLL of held-out demonstrations,
the length and EOS rate of sampled responses, and optionally lm-eval leaderboard tasks.

Log-probs are computed in float32 without autocast: the changes a small learning rate makes are
small, and bf16 rounding (about 0.1 nat per sequence) would drown them."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Example, Preference, load_preference_pairs
from ..data.sources import data_root
from ..encoding import Encoder, collate
from ..generation import QUIET, GenerationEngine, SamplingOptions, generate_ids
from ..logprobs import model_sequence_logps
from ..models import eval_mode, load_model_and_tokenizer
from ..templates import resolve_template
from .metrics import pair_sequence_logps, pair_values

PAIR_KEYS = {
    "implicit_acc": "implicit_reward_accuracy",
    "logp_gap": "logp_gap",
    "pair_win": "pair_win_rate",
}


@dataclass
class HeldoutOptions:
    max_length: int
    max_prompt_length: int
    eval_batch_size: int  # sequences per forward pass
    gen_prompts: int  # held-out prompts sampled per model
    max_new_tokens: int
    leaderboard_limit: int = 0  # items per task (0 = all)
    leaderboard_tasks: list[str] = field(default_factory=list)


def eval_pairs(rel: str, n: int) -> list[Preference]:
    """The first n preference pairs of a file under $DEMOALIGN_DATA, sorted by length so that
    batches hold similar lengths (the per-item values do not depend on order)."""
    pairs = load_preference_pairs(data_root() / rel, limit=n)
    return sorted(pairs, key=_text_length)


def _text_length(pair: Preference) -> int:
    return len(pair.example.prompt) + len(pair.example.response) + len(pair.rejected)


def length_filter(model: str, max_length: int, max_prompt_length: int):
    """Whether an example fits, uncut, in these limits (the model's own chat rendering)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    whole = Encoder(tokenizer, resolve_template(tokenizer, "auto"), 10**9, 10**9 - 1)

    def fits(ex: Example) -> bool:
        prompt = len(whole.prompt_ids(ex))
        response = len(whole.response_ids(ex.response))
        return prompt <= max_prompt_length and prompt + response <= max_length

    return fits


def leaderboard_tasks(spec: str, limit: int) -> tuple[list[str], str]:
    """The lm-eval tasks named in `spec` where lm-eval is installed, and a line saying so."""
    if not spec:
        return [], "not run (pass --leaderboard TASKS where lm-eval is installed)"
    from .leaderboard import MissingExtra, import_lm_eval, parse_tasks

    tasks = parse_tasks(spec)
    try:
        import_lm_eval()
    except MissingExtra as exc:
        return [], f"skipped: {exc}"
    return tasks, f"{', '.join(tasks)} ({limit or 'all'} items per task), lm-eval on local files"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class HeldoutEvaluator:
    """Per-item metrics of a model; the first model evaluated (the start model) gives the
    reference log-probs of the implicit reward. Metric names: <pair set>_implicit_acc,
    <pair set>_logp_gap, <pair set>_pair_win, <demos_name>_nll, gen_tokens, gen_eos, lb_<task>."""

    heldout: list[Example]
    pairs: dict[str, list[Preference]]  # {name: its pairs}
    options: HeldoutOptions
    device: torch.device
    engine: GenerationEngine  # the sweep's: every model is sampled through it
    demos_name: str = "dolly"
    ref: dict = field(default_factory=dict)

    def encoder(self, tokenizer) -> Encoder:
        template = resolve_template(tokenizer, "auto")
        return Encoder(tokenizer, template, self.options.max_length, self.options.max_prompt_length)

    def logps(self, model, tokenizer) -> dict:
        enc, bs = self.encoder(tokenizer), self.options.eval_batch_size
        out = {
            name: pair_sequence_logps(model, enc, pairs, bs, fit=True)
            for name, pairs in self.pairs.items()
        }
        out[self.demos_name] = self.demo_logps(model, tokenizer)
        return out

    @torch.no_grad()
    def demo_logps(self, model, tokenizer) -> tuple[list[float], list[int]]:
        """(sum of log-probs, response tokens) of each held-out demonstration."""
        enc = self.encoder(tokenizer)
        items = [enc.encode(ex) for ex in self.heldout]
        order = sorted(range(len(items)), key=lambda i: len(items[i].response_ids))
        sums, counts = [0.0] * len(items), [0] * len(items)
        device = next(model.parameters()).device
        with eval_mode(model):
            for start in range(0, len(order), self.options.eval_batch_size):
                idx = order[start : start + self.options.eval_batch_size]
                batch = collate([items[i] for i in idx], tokenizer.pad_token_id)
                lp, n = model_sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
                for i, a, b in zip(idx, lp.tolist(), n.tolist()):
                    sums[i], counts[i] = a, b
        return sums, counts

    def samples(self, model, tokenizer, seed: int) -> tuple[list[int], list[int], list[str]]:
        """Lengths, EOS flags (one sampled response per prompt) and the first two texts."""
        enc = self.encoder(tokenizer)
        ids = [enc.prompt_ids(ex) for ex in self.heldout[: self.options.gen_prompts]]
        options = SamplingOptions(self.options.max_new_tokens, batch_size=len(ids), seed=seed)
        out = generate_ids(self.engine, model, tokenizer, ids, options, QUIET)
        eos = tokenizer.eos_token_id
        lengths = [len(out[i]) for i in range(len(ids))]
        finished = [int(bool(out[i]) and out[i][-1] == eos) for i in range(len(ids))]
        texts = [
            tokenizer.decode(out[i], skip_special_tokens=True) for i in range(min(2, len(ids)))
        ]
        return lengths, finished, texts

    def items(self, model, tokenizer, gen_seed: int) -> tuple[dict, list[str]]:
        """{metric: per-item values} and two sampled responses (for a report)."""
        lp = self.logps(model, tokenizer)
        if not self.ref:
            self.ref = lp  # the first model evaluated is the start model
        values = {}
        for name in self.pairs:
            per = pair_values(*lp[name], *self.ref[name])
            for short, key in PAIR_KEYS.items():
                values[f"{name}_{short}"] = per[key]
        sums, counts = lp[self.demos_name]
        values[f"{self.demos_name}_nll"] = [-s / max(1, n) for s, n in zip(sums, counts)]
        lengths, finished, texts = self.samples(model, tokenizer, gen_seed)
        values["gen_tokens"] = [float(v) for v in lengths]
        values["gen_eos"] = [float(v) for v in finished]
        values.update(self.leaderboard(model, tokenizer))
        return values, texts

    def leaderboard(self, model, tokenizer) -> dict:
        if not self.options.leaderboard_tasks:
            return {}
        from .leaderboard import LeaderboardRun, run_leaderboard

        limit, batch = self.options.leaderboard_limit or None, self.options.eval_batch_size
        how = LeaderboardRun(data_root(), limit, 4, batch, 0, self.device)
        board = run_leaderboard(model, tokenizer, self.options.leaderboard_tasks, how)
        return {f"lb_{task}": [float(v) for v in r["values"]] for task, r in board.items()}

    def evaluate(self, path: Path, gen_seed: int) -> tuple[dict, list[str]]:
        """`items` of the model in the folder `path`, which is freed afterwards."""
        model, tokenizer = load_model_and_tokenizer(str(path))
        model.to(self.device)
        try:
            with self.engine.for_model(model):
                return self.items(model, tokenizer, gen_seed)
        finally:
            del model
            free_memory()
