"""Sequence log-probabilities: the SUM of response-token log-probs (docs/algorithms.md §1).

Prompt and padding positions carry label -100 and contribute nothing; the response's closing
EOS carries its own id as label and counts.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from .sharding import is_shard

IGNORE_INDEX = -100


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, rows_per_chunk: int = 4
) -> torch.Tensor:
    """Log-prob of each next-token label, 0 where the label is IGNORE_INDEX.

    logits: [B, L, V] predicting position t+1 from t; labels: [B, L] aligned with the input ids.
    Hand-written rather than `log_softmax(...).gather(...)` because that materialises a float32
    [B, L, V] tensor; here the float32 log-sum-exp is computed a few rows at a time.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    out = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        if torch.is_grad_enabled() and logits.requires_grad:
            # Without checkpointing autograd would keep every chunk's float32 copy for backward.
            out.append(
                torch.utils.checkpoint.checkpoint(
                    _rows_logps, logits[rows], safe_targets[rows], use_reentrant=False
                )
            )
        else:
            out.append(_rows_logps(logits[rows], safe_targets[rows]))
    result = torch.cat(out, dim=0)
    return result * mask


def _rows_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    chunk = logits.float()
    return chunk.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob per row, number of scored tokens per row)."""
    per_token = token_logps(logits, labels)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    return per_token.sum(-1), n_tokens


# Configs whose logits are rescaled or soft-capped after the LM head: scored from full logits.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _tile_logps(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias
) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _whole(weight: torch.Tensor) -> bool:
    """Whether this forward may read the head's weight directly. Under FSDP2 the root unit's
    parameters are whole inside its forward, but a head wrapped as its own unit is still a
    DTensor shard here, and a ZeRO-3 parameter is an empty placeholder outside its module's
    forward: then the model's own forward (which gathers them) computes the logits."""
    return not is_shard(weight)


class SequenceScorer(torch.nn.Module):
    """Wraps a causal LM so that its forward returns (summed response log-prob, scored tokens) per
    row.

    The LM head is applied only at positions whose next-token label is scored, a tile of
    `tile_tokens` positions at a time under activation checkpointing: neither the [B, L, V] logits
    nor a float32 copy of them exist at once, in the forward or the backward. Written by hand
    because transformers has no such head (TRL patches one into the model; we wrap instead, so
    the model itself is left untouched and DDP still sees one forward). Models that post-process
    their logits (soft-capping, scaling) fall back to the model's own logits.
    """

    def __init__(self, lm: torch.nn.Module, tile_tokens: int = 1024):
        super().__init__()
        self.lm = lm
        self.tile_tokens = tile_tokens
        # FSDP's transformer-based auto-wrap reads the wrapped module's layer classes from here.
        self._no_split_modules = getattr(lm, "_no_split_modules", None)
        text_config = (
            lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        )
        head = lm.get_output_embeddings()
        self.fused = isinstance(head, torch.nn.Linear) and not any(
            getattr(text_config, name, None) not in (None, 1.0) for name in _LOGIT_POSTPROCESSING
        )

    def tie_weights(self, *args, **kwargs):
        """accelerate's FSDP2 loading re-ties weights through the prepared module: without this
        a tied LM head would come back as a second, separately trained matrix."""
        return self.lm.tie_weights(*args, **kwargs)

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fused or not _whole(self.lm.get_output_embeddings().weight):
            logits = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
            return sequence_logps(logits, labels)
        # A peft model's `base_model` is its LoRA wrapper; the transformer trunk (with the adapters
        # injected in place) is the wrapped model's own `base_model`.
        model = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        rows = mask.nonzero()[:, 0]
        scored_hidden = hidden[:, :-1][mask]
        scored_targets = targets[mask]
        head = self.lm.get_output_embeddings()
        tiles = [
            torch.utils.checkpoint.checkpoint(
                _tile_logps,
                scored_hidden[i : i + self.tile_tokens],
                scored_targets[i : i + self.tile_tokens],
                head.weight,
                head.bias,
                use_reentrant=False,
            )
            for i in range(0, scored_targets.shape[0], self.tile_tokens)
        ]
        per_token = torch.cat(tiles) if tiles else scored_hidden.new_zeros(0, dtype=torch.float32)
        sums = torch.zeros(
            labels.shape[0], dtype=per_token.dtype, device=per_token.device
        ).index_add(0, rows, per_token)
        return sums, mask.sum(-1)


def model_sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a padded batch (input_ids, attention_mask, labels). `model` is a causal LM,
    a SequenceScorer, or a SequenceScorer wrapped by DDP."""
    if not isinstance(model, SequenceScorer) and not isinstance(
        getattr(model, "module", None), SequenceScorer
    ):
        model = SequenceScorer(model)
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"])
