"""Parity with TRL's DPOTrainer: the same tiny model, reference and (prompt, chosen, rejected) pairs
give the same tokenisation, the same summed sequence log-probs, the same loss and the same
gradient on our side (demoalign.encoding / pairs / methods) as on TRL's (its own dataset
preparation, data collator, fused log-prob head and `compute_loss`).

Both loss types that the two share are checked:
- sigmoid: TRL `-logsigmoid(beta * delta)`, ours `-log sigmoid(u)`;
- hinge:   TRL `relu(1 - beta * delta)` (trl/trainer/dpo_trainer.py, `loss_type == "hinge"`),
  ours `max(0, 1 - u)`; with delta = (log pi(y) - log ref(y)) - (log pi(y~) - log ref(y~)) and
  u = beta * delta these are the same formula (TRL's `hinge` has no 1/beta scaling of the margin).
TRL averages the per-pair losses over the batch; our loss_fn returns them per pair, so we compare
TRL's loss with the mean of ours.

TRL is a test-only dependency: the module is skipped when it is not installed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402

from demoalign.data import Example  # noqa: E402
from demoalign.encoding import Encoder  # noqa: E402
from demoalign.losses import pairwise_loss  # noqa: E402
from demoalign.methods.irft import irft_loss_fn  # noqa: E402
from demoalign.pairs import Pair, fill_reference_logps, pair_logps  # noqa: E402
from demoalign.templates import render_prompt, response_text  # noqa: E402
from demoalign.tiny import tiny_model, train_tokenizer  # noqa: E402

TEMPLATE = (
    "hh"  # the prompt ends with "Assistant:" and the response starts with " ": a token boundary
)

# (prompt, demonstration = chosen, negative = rejected); lengths differ so that padding is exercised
# on both halves of the batch and chosen/rejected of one pair differ in length.
ROWS = [
    (
        "How do I bake bread at home?",
        "Mix flour, water, salt and yeast, knead the dough, let it rise and bake it.",
        "I am sorry, but I cannot help with that request.",
    ),
    ("Add 12 and 30.", "42", "The quick brown fox jumps over the lazy dog."),
    ("What is the capital of France?", "The capital of France is Paris.", "Paris"),
    ("Sort the digits 3 1 2.", "1 2 3", "3 2 1 0"),
    (
        "Please explain what a neural network is, in simple words.",
        "A neural network is a function with many parameters, fitted to examples.",
        "A journey of a thousand miles begins with one step.",
    ),
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = train_tokenizer(vocab_size=512)
    reference = tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    reference.eval()
    policy = copy.deepcopy(reference)
    # Perturb the policy so that policy != reference: the margins are non-zero and the loss is not
    # trivially log 2 (sigmoid) or 1 (hinge).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.eval()

    examples = [Example(prompt=p, response=c) for p, c, _ in ROWS]
    encoder = Encoder(tok, TEMPLATE, max_length=512, max_prompt_length=128)
    pairs = []
    for i, (example, (_, _, rejected)) in enumerate(zip(examples, ROWS)):
        prompt_ids = encoder.prompt_ids(example)
        demo = encoder.fit(prompt_ids, encoder.response_ids(example.response))
        neg = encoder.fit(prompt_ids, encoder.response_ids(rejected))
        pairs.append(Pair(demo.prompt_ids, demo.response_ids, neg.response_ids, index=i))

    # The same pairs as text, the way a TRL user would give them (TRL appends the EOS itself).
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [render_prompt(e, tok, TEMPLATE) for e in examples],
            "chosen": [response_text(c, TEMPLATE) for _, c, _ in ROWS],
            "rejected": [response_text(r, TEMPLATE) for _, _, r in ROWS],
        }
    )
    return tok, policy, reference, pairs, dataset


def make_trl_trainer(tok, policy, reference, dataset, loss_type, beta, tmp_path):
    """A DPOTrainer on copies of our models (TRL patches their forward with its fused head)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(
            output_dir=str(tmp_path / f"trl-{loss_type}-{beta}"),
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=True,
            per_device_train_batch_size=len(ROWS),
            beta=beta,
            loss_type=[loss_type],
            max_length=None,
        )
        return trl.DPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=args,
            train_dataset=dataset,
            processing_class=tok,
        )


def trl_batch(trainer):
    """One batch built by TRL's own data pipeline: its tokenised dataset and its collator."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return rows, trainer.data_collator(rows)


@pytest.fixture(scope="module")
def ours_logps(setup):
    tok, policy, reference, pairs, _ = setup
    pairs = [copy.deepcopy(p) for p in pairs]
    fill_reference_logps(
        reference, pairs, tok.pad_token_id, batch_size=2, autocast=contextlib.nullcontext
    )
    with torch.no_grad():
        demo, neg, _, _ = pair_logps(policy, pairs, tok.pad_token_id)
    ref_demo = torch.tensor([p.ref_chosen for p in pairs])
    ref_neg = torch.tensor([p.ref_rejected for p in pairs])
    return pairs, demo, neg, ref_demo, ref_neg


@pytest.fixture(scope="module")
def trl_sigmoid(setup, tmp_path_factory):
    tok, policy, reference, _, dataset = setup
    return make_trl_trainer(
        tok, policy, reference, dataset, "sigmoid", 0.1, tmp_path_factory.mktemp("trl")
    )


def test_tokenisation_identical(setup, trl_sigmoid):
    tok, _, _, pairs, _ = setup
    rows, batch = trl_batch(trl_sigmoid)
    assert len(rows) == len(pairs)
    for row, pair in zip(rows, pairs):
        assert row["prompt_ids"] == pair.prompt_ids
        assert row["chosen_ids"] == pair.chosen_ids
        assert row["rejected_ids"] == pair.rejected_ids
        # Both sides end the completion with the EOS, and it is scored.
        assert row["chosen_ids"][-1] == tok.eos_token_id == pair.chosen_ids[-1]
        assert row["rejected_ids"][-1] == tok.eos_token_id == pair.rejected_ids[-1]
    # TRL's collator scores exactly the completion tokens (EOS included), and so does ours.
    n_completion = batch["completion_mask"].sum(-1).tolist()
    assert n_completion == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_sequence_logps_match_trl(ours_logps, trl_sigmoid):
    _, demo, neg, ref_demo, ref_neg = ours_logps
    trainer = trl_sigmoid
    _, batch = trl_batch(trainer)
    with torch.no_grad():
        # TRL's own per-sequence log-prob routine (its fused LM head, prompt masked, EOS scored),
        # once with the policy and once with the reference model it holds.
        trl_demo, trl_neg = trainer.compute_ref_log_probs(trainer.model, batch)
        trl_ref_demo, trl_ref_neg = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    # Guard: the comparison is not between zeros, and policy and reference really differ.
    assert (demo.abs() > 1.0).all() and (neg.abs() > 1.0).all()
    assert not torch.allclose(demo, ref_demo, atol=1e-2)
    torch.testing.assert_close(demo, trl_demo, atol=1e-4, rtol=0)
    torch.testing.assert_close(neg, trl_neg, atol=1e-4, rtol=0)
    torch.testing.assert_close(ref_demo, trl_ref_demo, atol=1e-4, rtol=0)
    torch.testing.assert_close(ref_neg, trl_ref_neg, atol=1e-4, rtol=0)


def trl_loss(trainer, batch, grad=False):
    trainer.model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        loss = trainer.compute_loss(trainer.model, batch)
    if grad:
        loss.backward()
    return loss.detach()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_loss_matches_trl(setup, ours_logps, loss_type, tmp_path):
    tok, policy, reference, _, dataset = setup
    _, demo, neg, ref_demo, ref_neg = ours_logps
    beta = 0.1
    trainer = make_trl_trainer(tok, policy, reference, dataset, loss_type, beta, tmp_path)
    _, batch = trl_batch(trainer)
    expected = trl_loss(trainer, batch)

    ours = pairwise_loss(demo, neg, ref_demo, ref_neg, beta, loss_type).mean()
    trivial = math.log(2) if loss_type == "sigmoid" else 1.0
    assert abs(ours.item() - trivial) > 1e-3, "policy == reference: the comparison would be vacuous"
    assert ours.item() > 1e-3, "every pair past the hinge: the comparison would be vacuous"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    # The assertion can fail: another beta gives a different loss.
    other = pairwise_loss(demo, neg, ref_demo, ref_neg, 2 * beta, loss_type).mean()
    assert not torch.isclose(other, expected, rtol=1e-4, atol=1e-6)


def test_irft_loss_fn_loss_and_gradient_match_trl(setup, ours_logps, trl_sigmoid):
    """End to end: our training loss function (one forward over [demos; negatives], reference
    log-probs precomputed by fill_reference_logps) gives TRL's loss and TRL's gradient."""
    tok, policy, _, _, _ = setup
    pairs = ours_logps[0]
    beta = 0.1
    model = copy.deepcopy(policy)
    model.zero_grad(set_to_none=True)
    per_pair, stats, n_tokens = irft_loss_fn(beta, "sigmoid", 0.0, tok.pad_token_id)(model, pairs)
    loss = per_pair.mean()
    loss.backward()

    trainer = trl_sigmoid
    _, batch = trl_batch(trainer)
    expected = trl_loss(trainer, batch, grad=True)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert n_tokens.item() == batch["completion_mask"].sum().item()

    ours_grads = dict(model.named_parameters())
    compared = 0
    for name, p in trainer.model.named_parameters():
        if p.grad is None:
            continue
        g = ours_grads[name].grad
        assert g is not None, name
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-3, msg=lambda m: f"{name}: {m}")
        compared += 1
    assert compared == sum(1 for _ in model.parameters())
