"""SFT: the token-mean negative log-likelihood of the demonstrated responses
(docs/algorithms.md)."""

from __future__ import annotations

from ..encoding import Tokenized, collate
from ..logprobs import model_sequence_logps
from ..losses import nll
from ..trainer import FitPlan, steps_per_epoch
from .context import RunContext


def sft_loss_fn(pad_id: int):
    def loss_fn(model, items: list[Tokenized]):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        logps, n_tokens = model_sequence_logps(model, batch)
        return nll(logps), {"response_tokens": n_tokens.float()}, n_tokens.sum()

    return loss_fn


def response_tokens(items: list[Tokenized]) -> float:
    """SFT is normalised per token of the global batch (the usual token-mean NLL)."""
    return float(sum(len(t.response_ids) for t in items))


class State:
    """SFT keeps nothing of its own: where it is inside its epochs is the trainer's position."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check(config, n_examples: int) -> None:
    """SFT takes any non-empty set of demonstrations (the data readers refuse an empty one)."""


def run(ctx: RunContext) -> dict:
    """Returns the truncation counts of the run. Checkpoints at every epoch end (and every
    `save_steps`); a resumed run continues at the checkpoint's epoch and step."""
    config, trainer, encoder = ctx.config, ctx.trainer, ctx.encoder
    items = [encoder.encode(e) for e in ctx.examples]
    counts = encoder.counts.as_dict()
    if not ctx.checkpoints.resuming:
        trainer.log.write({"event": "data", **counts})
    trainer.start_schedule(config.epochs * steps_per_epoch(len(items), trainer.global_batch))
    resumed = ctx.checkpoints.restore()
    plan = FitPlan(
        sft_loss_fn(encoder.tokenizer.pad_token_id),
        response_tokens,
        config.epochs,
        seed_parts=(config.seed, 0),
        context={"method": "sft"},
        desc="sft",
        resume=resumed,
        after_step=ctx.checkpoints.after_step_or_epoch,
    )
    trainer.fit(items, plan)
    return counts
