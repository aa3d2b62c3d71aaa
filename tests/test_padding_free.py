"""Padding-free forwards: the rows of a micro-batch packed into one row give the padded forward's
log-probs, IRFT loss and gradients (fp32), and the LM head runs only on scored positions."""

from contextlib import nullcontext

import pytest
import torch

from conftest import DOLLY, fresh_model
from demoalign.data import Example, load_examples
from demoalign.encoding import Encoder, collate
from demoalign.logprobs import SequenceScorer, pack_rows, padding_free_works
from demoalign.methods.irft import irft_loss_fn
from demoalign.pairs import Pair, fill_reference_logps
from demoalign.trainer import disable_dropout, use_padding_free

HISTORY = (("user", "What is two and two?"), ("assistant", "Four, of course."))


def make_pairs(tokenizer, n: int, max_prompt_length: int = 40, history: bool = False):
    """Pairs of mixed lengths: each demonstration against the next example's response."""
    examples, _ = load_examples(DOLLY, limit=max(n, 2))
    if history:
        examples = [
            Example(e.prompt, e.response, HISTORY[: 1 + i % 2]) for i, e in enumerate(examples)
        ]
    encoder = Encoder(tokenizer, "instruction", 400, max_prompt_length)
    pairs = []
    for i, e in enumerate(examples[:n]):
        demo = encoder.encode(e)
        other = encoder.response_ids(examples[(i + 1) % len(examples)].response)
        neg = encoder.fit(demo.prompt_ids, other)
        pairs.append(Pair(demo.prompt_ids, demo.response_ids, neg.response_ids, index=i))
    return pairs, encoder


def test_pack_rows_restarts_positions_and_never_predicts_across_sequences():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 6, 7, -100], [8, 9, -100, -100]])  # row 2: no prompt at all
    inputs, targets, rows = pack_rows(ids, attention, labels)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Row 1's last token predicts nothing (not row 2's first token, although that one is scored
    # in its own row, where nothing predicts it).
    assert targets.tolist() == [6, 7, -100, 9, -100]
    assert rows.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "n, max_prompt_length, history",
    [(4, 40, False), (3, 40, True), (3, 8, False), (1, 40, False)],
    ids=["mixed-lengths", "history-turns", "truncated-prompts", "batch-of-one"],
)
def test_padding_free_equals_padded_in_logps_irft_loss_and_every_gradient(
    tiny_model_dir, tokenizer, n, max_prompt_length, history
):
    _compare_padded_and_packed(tiny_model_dir, tokenizer, n, max_prompt_length, history, True)


def test_padding_free_equals_padded_through_the_models_own_logits(tiny_model_dir, tokenizer):
    """Models that post-process their logits are scored from the model's logits, packed too."""
    _compare_padded_and_packed(tiny_model_dir, tokenizer, 3, 40, False, False)


def _compare_padded_and_packed(tiny_model_dir, tokenizer, n, max_prompt_length, history, fused):
    model = fresh_model(tiny_model_dir)
    disable_dropout(model)
    pad = tokenizer.pad_token_id
    pairs, encoder = make_pairs(tokenizer, n, max_prompt_length, history)
    if max_prompt_length == 8:
        assert encoder.counts.prompts_cut > 0
    lengths = {len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)}
    assert len(lengths) > 1  # padding is really there
    fill_reference_logps(model, pairs, pad, 4, nullcontext, True, padding_free=False)
    padded, packed = (
        _scores_and_gradients(model, pairs, pad, SequenceScorer(model, 7, padding_free), fused)
        for padding_free in (False, True)
    )
    assert torch.equal(padded["counts"], packed["counts"])
    assert int(padded["tokens"]) == int(packed["tokens"])
    torch.testing.assert_close(packed["logps"], padded["logps"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed["losses"], padded["losses"], atol=1e-5, rtol=1e-4)
    for name, grad in padded["logp_grads"].items():  # d(weighted sum of log-probs)/d(param)
        torch.testing.assert_close(packed["logp_grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # The IRFT loss's gradient is a difference of two nearly equal ones (demonstration and
    # negative share the prompt; u is about 0), which magnifies fp32 rounding of log-probs that
    # are sums of hundreds of terms (fp32's step at -2000 is 1e-4) to 1e-3 of the gradient: in
    # float64 the two paths must give the same gradient of every parameter.
    model.double()
    fill_reference_logps(model, pairs, pad, 4, nullcontext, True, padding_free=False)
    padded, packed = (
        _scores_and_gradients(model, pairs, pad, SequenceScorer(model, 7, padding_free), fused)
        for padding_free in (False, True)
    )
    assert packed["losses"].dtype == torch.float64
    torch.testing.assert_close(packed["losses"], padded["losses"], atol=1e-10, rtol=1e-10)
    for name, grad in padded["loss_grads"].items():
        assert grad.abs().max() > 0 or "layers" not in name, name
        torch.testing.assert_close(packed["loss_grads"][name], grad, atol=1e-12, rtol=1e-8)


def _scores_and_gradients(model, pairs, pad: int, scorer, fused: bool) -> dict:
    """Log-probs of every row, the IRFT loss of every pair, and the gradients of both."""
    scorer.fused = fused and scorer.fused
    batch = collate([r for p in pairs for r in _rows(p)], pad)
    model.zero_grad()
    logps, counts = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
    (logps * torch.linspace(-1.0, 2.0, len(logps))).sum().backward()
    logp_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    losses, _, tokens = irft_loss_fn(0.3, "sigmoid", 0.5, pad)(scorer, pairs)
    losses.sum().backward()
    loss_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return dict(
        logps=logps.detach(),
        counts=counts,
        losses=losses.detach(),
        tokens=tokens,
        logp_grads=logp_grads,
        loss_grads=loss_grads,
    )


def _rows(pair: Pair):
    from demoalign.encoding import Tokenized

    return [
        Tokenized(pair.prompt_ids, pair.chosen_ids),
        Tokenized(pair.prompt_ids, pair.rejected_ids),
    ]


def test_reference_log_probs_take_the_training_path(tiny_model_dir, tokenizer):
    """With the same path for reference and policy, u is exactly 0 at a stage's first step."""
    model = fresh_model(tiny_model_dir)
    disable_dropout(model)
    pad = tokenizer.pad_token_id
    pairs, _ = make_pairs(tokenizer, 6)
    fill_reference_logps(model, pairs, pad, 3, nullcontext, True, padding_free=True)
    scorer = SequenceScorer(model, padding_free=True)
    _, stats, _ = irft_loss_fn(0.1, "sigmoid", 0.0, pad)(scorer, pairs)
    assert torch.equal(stats["margin"], torch.zeros(len(pairs)))


def test_the_head_sees_scored_positions_only_a_tile_at_a_time(
    tiny_model_dir, tokenizer, monkeypatch
):
    """No [tokens x vocabulary] tensor: the head's matmul gets at most `tile_tokens` rows, and
    exactly the scored positions (response tokens) in all, padded or packed."""
    import demoalign.logprobs as logprobs

    model = fresh_model(tiny_model_dir)
    pairs, _ = make_pairs(tokenizer, 4)
    batch = collate([r for p in pairs for r in _rows(p)], tokenizer.pad_token_id)
    scored = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    real_tile = logprobs._tile_logps
    for padding_free in (False, True):
        seen = []
        monkeypatch.setattr(
            logprobs, "_tile_logps", lambda h, *a: seen.append(h.shape[0]) or real_tile(h, *a)
        )
        scorer = SequenceScorer(model, tile_tokens=16, padding_free=padding_free)
        scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])[0].sum().backward()
        assert sum(seen) >= scored and max(seen) <= 16
        assert sum(seen) in (scored, 2 * scored)  # forward, and the checkpointed recomputation


def test_a_model_that_attends_across_packed_sequences_is_detected(tiny_model_dir, monkeypatch):
    import transformers.masking_utils as masking

    model = fresh_model(tiny_model_dir)
    assert padding_free_works(model)
    assert use_padding_free("true", model, torch.device("cpu"))
    assert not use_padding_free("auto", model, torch.device("cpu"))  # CPU: the padded figures
    assert not use_padding_free("auto", model, torch.device("cuda"))  # sdpa: a dense N x N mask
    model.config._attn_implementation = "flex_attention"
    assert use_padding_free("auto", model, torch.device("cuda"))
    model.config._attn_implementation = "sdpa"
    assert not use_padding_free("false", model, torch.device("cuda"))
    # As if the model ignored the packing: one causal mask over the whole packed row.
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not padding_free_works(model)
    assert not use_padding_free("auto", model, torch.device("cuda"))
    with pytest.raises(ValueError, match="does not mask packed sequences"):
        use_padding_free("true", model, torch.device("cpu"))
