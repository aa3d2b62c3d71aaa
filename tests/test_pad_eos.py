"""Tokenizers whose pad token is their EOS (or that have no pad token at all, so the loader sets
pad = EOS): the closing EOS of every response must still be a label, or the model never learns
to stop. Padding is told apart by position (the sequence lengths), never by token id."""

from __future__ import annotations

import torch

from demoalign.data import Example
from demoalign.encoding import Encoder, collate
from demoalign.logprobs import IGNORE_INDEX, sequence_logps, token_logps
from demoalign.models import load_model_and_tokenizer
from demoalign.tiny import tiny_model, train_tokenizer


def pad_is_eos_tokenizer():
    tok = train_tokenizer(vocab_size=300)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def encode_rows(tok):
    enc = Encoder(tok, "instruction", max_length=64, max_prompt_length=32)
    # Responses of different lengths: the short row is padded with the pad id, which is EOS.
    examples = [Example("Add 12 and 30.", "42"), Example("Sort 3 1 2.", "The digits are 1 2 3.")]
    return [enc.encode(e) for e in examples]


def assert_every_response_ends_in_a_learnt_eos(tok, items):
    eos = tok.eos_token_id
    batch = collate(items, tok.pad_token_id)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in items]
    assert min(lengths) < max(lengths), (
        "the batch must contain padding for this test to mean anything"
    )
    for row, (t, n) in enumerate(zip(items, lengths)):
        assert t.response_ids[-1] == eos
        assert batch["labels"][row, n - 1].item() == eos, (
            "the closing EOS must be a label, not masked"
        )
        start = len(t.prompt_ids)
        assert batch["labels"][row, start:n].tolist() == t.response_ids
        # Padding after the EOS carries the same id but is masked: position decides, not the id.
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == eos).all()
        assert (batch["labels"][row, :start] == IGNORE_INDEX).all()
    return batch


def test_pad_equal_to_eos_keeps_the_eos_label():
    tok = pad_is_eos_tokenizer()
    assert_every_response_ends_in_a_learnt_eos(tok, encode_rows(tok))


def test_the_eos_token_counts_in_the_sequence_log_prob():
    tok = pad_is_eos_tokenizer()
    items = encode_rows(tok)
    batch = assert_every_response_ends_in_a_learnt_eos(tok, items)
    model = tiny_model(tok, hidden_size=32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, n_tokens = sequence_logps(logits, batch["labels"])
    assert n_tokens.tolist() == [len(t.response_ids) for t in items], (
        "EOS is one of the scored tokens"
    )
    per_token = token_logps(logits, batch["labels"])
    for row, t in enumerate(items):
        n = len(t.prompt_ids) + len(t.response_ids)
        # The log-prob of predicting EOS at the last position (made from position n - 2).
        assert per_token[row, n - 2].item() < 0
        expected = torch.log_softmax(logits[row, n - 2], -1)[tok.eos_token_id]
        torch.testing.assert_close(per_token[row, n - 2], expected)
        assert torch.isclose(logps[row], per_token[row, : n - 1].sum())


def test_a_tokenizer_without_pad_gets_pad_eos_and_still_learns_eos(tmp_path):
    tok = train_tokenizer(vocab_size=300)
    model = tiny_model(tok, hidden_size=32)
    tok.pad_token = None
    assert tok.pad_token_id is None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_model_and_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id
    assert_every_response_ends_in_a_learnt_eos(loaded, encode_rows(loaded))
