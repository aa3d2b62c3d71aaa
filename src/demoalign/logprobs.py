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


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _rows_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    chunk = _at_least_fp32(logits)
    return chunk.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1)


def _scored_logps(logits: torch.Tensor, targets: torch.Tensor, tile: int) -> torch.Tensor:
    """[N] log-probs of `targets` under `logits` [N, V], `tile` positions at a time (their float32
    copies are recomputed in the backward, as in `token_logps`)."""
    out = []
    for i in range(0, targets.shape[0], tile):
        part = (logits[i : i + tile], targets[i : i + tile])
        if torch.is_grad_enabled() and logits.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(_rows_logps, *part, use_reentrant=False))
        else:
            out.append(_rows_logps(*part))
    return torch.cat(out) if out else _at_least_fp32(logits.new_zeros(0))


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
    logits = _at_least_fp32(torch.nn.functional.linear(hidden, weight, bias))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _whole(weight: torch.Tensor) -> bool:
    """Whether this forward may read the head's weight directly. Under FSDP2 the root unit's
    parameters are whole inside its forward, but a head wrapped as its own unit is still a
    DTensor shard here, and a ZeRO-3 parameter is an empty placeholder outside its module's
    forward: then the model's own forward (which gathers them) computes the logits."""
    return not is_shard(weight)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] label of the token that position t predicts (IGNORE_INDEX after the last one)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def pack_rows(input_ids, attention_mask, labels) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A right-padded batch as ONE row of its real tokens, for a padding-free forward:
    ({input_ids, position_ids} of shape [1, N] with positions restarting at every sequence, no
    attention mask: transformers then masks attention within each sequence), the target of every
    packed position, and the batch row it came from. A position's target is taken before packing,
    so a sequence's last token never predicts the next sequence's first."""
    keep = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1
    inputs = {"input_ids": input_ids[keep][None], "position_ids": positions[keep][None]}
    return inputs, next_token_targets(labels)[keep], keep.nonzero()[:, 0]


def call_module(module: torch.nn.Module, **inputs):
    """`module(**inputs)`: how a SequenceScorer calls its trunk or its LM. compile_training
    swaps in a compiled version of this call for one scorer (compilation.compile_forward): the
    transformer compiled, the data-dependent selection of scored positions left outside it."""
    return module(**inputs)


class SequenceScorer(torch.nn.Module):
    """Wraps a causal LM so that its forward returns (summed response log-prob, scored tokens) per
    row.

    The LM head is applied only at positions whose next-token label is scored, a tile of
    `tile_tokens` positions at a time under activation checkpointing: neither the [B, L, V] logits
    nor a float32 copy of them exist at once, in the forward or the backward. Written by hand
    because transformers has no such head (TRL patches one into the model; we wrap instead, so
    the model itself is left untouched and DDP still sees one forward). Models that post-process
    their logits (soft-capping, scaling) fall back to the model's own logits.

    `padding_free`: the rows' real tokens are concatenated into one row (`pack_rows`), so no
    FLOPs go to padding; the values equal the padded forward's up to float rounding
    (`padding_free_works` checks a model once).
    """

    def __init__(self, lm: torch.nn.Module, tile_tokens: int = 1024, padding_free: bool = False):
        super().__init__()
        self.lm = lm
        self.tile_tokens = tile_tokens
        self.padding_free = padding_free
        self.call_model = call_module  # a plain function: no module, no state_dict entry
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

    def _fused_head(self) -> bool:
        return self.fused and _whole(self.lm.get_output_embeddings().weight)

    def _trunk(self):
        # A peft model's `base_model` is its LoRA wrapper; the transformer trunk (with the adapters
        # injected in place) is the wrapped model's own `base_model`.
        model = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return model.base_model

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if self.padding_free:
            return self._packed_forward(input_ids, attention_mask, labels)
        if not self._fused_head():
            logits = self.call_model(
                self.lm, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
            return sequence_logps(logits, labels)
        hidden = self.call_model(
            self._trunk(), input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        rows = mask.nonzero()[:, 0]
        per_token = self._head_logps(hidden[:, :-1][mask], targets[mask])
        sums = torch.zeros(
            labels.shape[0], dtype=per_token.dtype, device=per_token.device
        ).index_add(0, rows, per_token)
        return sums, mask.sum(-1)

    def _packed_forward(self, input_ids, attention_mask, labels):
        inputs, targets, rows = pack_rows(input_ids, attention_mask, labels)
        scored = targets != IGNORE_INDEX
        if self._fused_head():
            hidden = self.call_model(self._trunk(), **inputs, use_cache=False).last_hidden_state[0]
            per_token = self._head_logps(hidden[scored], targets[scored])
        else:
            logits = self.call_model(self.lm, **inputs, use_cache=False).logits[0]
            per_token = _scored_logps(logits[scored], targets[scored], self.tile_tokens)
        n, rows = labels.shape[0], rows[scored]
        sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device)
        return sums.index_add(0, rows, per_token), torch.bincount(rows, minlength=n)

    def _head_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Log-prob of each target from its hidden state, the head applied a tile at a time."""
        head = self.lm.get_output_embeddings()
        tiles = [
            torch.utils.checkpoint.checkpoint(
                _tile_logps,
                hidden[i : i + self.tile_tokens],
                targets[i : i + self.tile_tokens],
                head.weight,
                head.bias,
                use_reentrant=False,
            )
            for i in range(0, targets.shape[0], self.tile_tokens)
        ]
        return torch.cat(tiles) if tiles else _at_least_fp32(hidden.new_zeros(0))


@torch.no_grad()
def padding_free_works(lm: torch.nn.Module, atol: float = 1e-4) -> bool:
    """Whether this model masks packed sequences (transformers does it from `position_ids` for
    the models built on its masking utilities): two sequences of different lengths scored padded
    and packed, in fp32, must agree. A model that ignores `position_ids`, or attends across the
    sequences of a packed row, fails."""
    device = next(lm.parameters()).device
    vocab = lm.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=generator).to(device)
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    labels = ids.masked_fill(attention == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    was_training = lm.training
    lm.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            padded = SequenceScorer(lm)(ids, attention, labels)[0]
            packed = SequenceScorer(lm, padding_free=True)(ids, attention, labels)[0]
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        lm.train(was_training)
    return bool(torch.allclose(padded.float(), packed.float(), atol=atol, rtol=1e-4))


def model_sequence_logps(
    model, batch: dict, padding_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a padded batch (input_ids, attention_mask, labels). `model` is a causal LM
    (scored padding-free when `padding_free`), a SequenceScorer, or a SequenceScorer wrapped by DDP
    (which has its own setting)."""
    if not isinstance(model, SequenceScorer) and not isinstance(
        getattr(model, "module", None), SequenceScorer
    ):
        model = SequenceScorer(model, padding_free=padding_free)
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"])
