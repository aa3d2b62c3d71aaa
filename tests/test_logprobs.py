import math

import torch

from conftest import fresh_model
from demoalign.encoding import Tokenized, collate
from demoalign.logprobs import IGNORE_INDEX, model_sequence_logps, sequence_logps, token_logps


def test_token_logps_by_hand():
    # Vocabulary of 2. Position 0 predicts label[1] = 1 with logits [0, ln 3]: p = 3/4.
    # Position 1 predicts label[2] = 0 with logits [ln 4, 0]: p = 4/5.
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(4), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    logp, n = sequence_logps(logits, labels)
    assert n.item() == 2
    assert logp.item() == pytest_approx(math.log(3 / 4) + math.log(4 / 5))
    # A masked label contributes nothing.
    masked = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    assert sequence_logps(logits, masked)[0].item() == pytest_approx(math.log(4 / 5))


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6, abs=1e-6)


def test_chunked_equals_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11)
    labels = torch.randint(0, 11, (5, 7))
    labels[:, :3] = IGNORE_INDEX
    full = (
        torch.log_softmax(logits[:, :-1], -1)
        .gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
    )
    full = full * (labels[:, 1:] != IGNORE_INDEX)
    for rows in (1, 2, 8):
        assert torch.allclose(token_logps(logits, labels, rows_per_chunk=rows), full, atol=1e-6)


def _logp(model, items, pad_id):
    with torch.no_grad():
        return model_sequence_logps(model.eval(), collate(items, pad_id))[0]


def test_padding_and_prompt_tokens_do_not_count_eos_does(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt = tokenizer("### Instruction: add 2 and 3\n\n### Response: ")["input_ids"]
    response = tokenizer("5", add_special_tokens=False)["input_ids"] + [eos]
    long = Tokenized(
        prompt,
        tokenizer("a much longer answer that forces padding", add_special_tokens=False)["input_ids"]
        + [eos],
    )
    alone = _logp(model, [Tokenized(prompt, response)], pad)
    padded = _logp(model, [Tokenized(prompt, response), long], pad)[0]
    assert torch.allclose(alone, padded, atol=1e-5), "right padding changed a response's log-prob"

    # Only response positions count: the score equals a manual sum over response positions,
    # and differs from the sum that would also include the prompt's tokens.
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1], -1)
    per_pos = logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    response_only = per_pos[len(prompt) - 1 :].sum()
    assert torch.allclose(alone[0], response_only, atol=1e-5)
    assert not torch.allclose(alone[0], per_pos.sum(), atol=1e-3)

    # The closing EOS is scored: dropping it changes the value by exactly log p(EOS | ...).
    without_eos = _logp(model, [Tokenized(prompt, response[:-1])], pad)
    assert torch.allclose(alone - without_eos, per_pos[-1:], atol=1e-5)
    assert per_pos[-1].item() < 0


def test_tiled_lm_head_equals_full_logits_in_value_and_gradient(tiny_model_dir, tokenizer):
    from demoalign.logprobs import SequenceScorer

    model = fresh_model(tiny_model_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    items = [
        Tokenized(
            tokenizer("### Instruction: hi\n\n### Response: ")["input_ids"],
            tokenizer("hello there", add_special_tokens=False)["input_ids"] + [eos],
        ),
        Tokenized(
            tokenizer("Q: 2+2?")["input_ids"],
            tokenizer(" 4", add_special_tokens=False)["input_ids"] + [eos],
        ),
    ]
    batch = collate(items, pad)
    fused = SequenceScorer(model, tile_tokens=3)  # several tiles, one of them partial
    full = SequenceScorer(model)
    full.fused = False
    assert fused.fused
    results = []
    for scorer in (fused, full):
        model.zero_grad()
        logps, n = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        (logps * torch.tensor([1.0, -2.0])).sum().backward()
        results.append(
            (logps.detach(), n, torch.cat([p.grad.flatten() for p in model.parameters()]))
        )
    (a, na, ga), (b, nb, gb) = results
    assert torch.equal(na, nb) and na.tolist() == [len(i.response_ids) for i in items]
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4)
    assert ga.abs().max() > 0


def test_a_head_whose_weight_is_a_shard_is_applied_by_the_model_itself(tiny_model_dir, tokenizer):
    """Outside its own forward a ZeRO-3 parameter is an empty placeholder (and an FSDP2 head of
    its own unit a shard): then the logits come from the model's forward, which gathers it."""
    from demoalign.logprobs import SequenceScorer

    model = fresh_model(tiny_model_dir)
    items = [Tokenized(tokenizer("Q: 2+2?")["input_ids"], [tokenizer.eos_token_id])]
    batch = collate(items, tokenizer.pad_token_id)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    scorer = SequenceScorer(model)
    fused, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert calls == []  # the tiled path reads the weight; the head module never runs
    model.lm_head.weight.ds_id = 0
    gathered, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert calls == [1]
    torch.testing.assert_close(gathered, fused, rtol=1e-5, atol=1e-5)
