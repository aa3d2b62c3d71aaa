"""SFT: the token-mean negative log-likelihood of the demonstrated responses
(docs/algorithms.md)."""

from __future__ import annotations

from ..checkpoint import Checkpoints
from ..encoding import Encoder, Tokenized, collate
from ..logprobs import model_sequence_logps
from ..losses import nll
from ..trainer import Trainer, steps_per_epoch


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


def run_sft(config, trainer: Trainer, encoder: Encoder, examples: list, ckpt=None) -> dict:
    """Returns the truncation counts of the run. Checkpoints at every epoch end (and every
    `save_steps`); a resumed run continues at the checkpoint's epoch and step."""
    ckpt = ckpt or Checkpoints.disabled()
    items = [encoder.encode(e) for e in examples]
    counts = encoder.counts.as_dict()
    if ckpt.pending is None:
        trainer.log.write({"event": "data", **counts})
    total = config.epochs * steps_per_epoch(len(items), trainer.global_batch)
    trainer.start_schedule(total)
    ckpt.save_at_epoch_end = True
    ckpt.state_fn = lambda: {"fit": trainer.position}
    resumed = ckpt.restore()
    trainer.fit(
        items,
        sft_loss_fn(encoder.tokenizer.pad_token_id),
        response_tokens,
        config.epochs,
        seed_parts=(config.seed, 0),
        context={"method": "sft"},
        desc="sft",
        start=resumed["fit"] if resumed else None,
    )
    return counts
