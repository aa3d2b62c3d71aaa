"""compile_training: a compiled training forward gives the uncompiled loss and gradients, its
graph breaks and recompiles are reported in one line, once, and nothing saved carries the
compiled module's `_orig_mod.` prefix. The compile runs with torch's "eager" or "aot_eager"
backend (the same graph capture as the default, without inductor's code generation, minutes on
two CPU cores), set through `compilation.BACKEND`."""

import os
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from test_padding_free import make_pairs
from torch._dynamo.utils import counters

import demoalign.compilation as compilation
from conftest import fresh_model, read_metrics, small_run_config
from demoalign import SFTConfig, train
from demoalign.config import IRFTConfig
from demoalign.logprobs import SequenceScorer
from demoalign.methods.irft import irft_loss_fn
from demoalign.pairs import fill_reference_logps
from demoalign.runio import MetricsLog
from demoalign.trainer import FitPlan, Levers, Trainer, disable_dropout, make_accelerator

REPORT = "demoalign: compile_training:"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no graphs or counters of an earlier test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_only_true_compiles_until_a_gpu_measurement_says_auto_should():
    assert compilation.use_compile("true") and compilation.use_compile("True")  # YAML's true
    assert not compilation.use_compile("auto") and not compilation.use_compile("false")


def test_the_option_takes_yaml_booleans_and_refuses_other_values():
    config = IRFTConfig(model="m", data="d", compile_training="True")
    config.validate()
    assert config.compile_training == "true"
    with pytest.raises(ValueError, match="compile_training"):
        IRFTConfig(model="m", data="d", compile_training="sometimes").validate()


@pytest.mark.parametrize(
    "backend, padding_free", [("eager", False), ("aot_eager", True)], ids=["padded", "packed"]
)
def test_compiled_forward_gives_the_same_loss_and_every_gradient(
    tiny_model_dir, tokenizer, monkeypatch, backend, padding_free
):
    monkeypatch.setattr(compilation, "BACKEND", backend)
    model, pairs = _model_and_pairs(tiny_model_dir, tokenizer)
    plain = _loss_and_gradients(SequenceScorer(model, padding_free=padding_free), pairs, tokenizer)
    scorer = SequenceScorer(model, padding_free=padding_free)
    compilation.compile_forward(scorer)
    for _ in range(2):  # the compiling call, then the compiled graphs
        compiled = _loss_and_gradients(scorer, pairs, tokenizer)
        assert counters["stats"]["unique_graphs"] >= 1  # a graph was captured: not a no-op
        assert torch.equal(compiled["losses"], plain["losses"])
        for name, grad in plain["grads"].items():
            assert grad.abs().max() > 0 or "layers" not in name, name
            assert torch.equal(compiled["grads"][name], grad), name
    assert list(scorer.state_dict()) == list(SequenceScorer(model).state_dict())  # no _orig_mod


@pytest.mark.slow  # inductor's code generation: about a minute on two cores
def test_compiled_forward_with_the_default_backend(tiny_model_dir, tokenizer):
    """inductor fuses the model's RMSNorm, which runs in float32 even in a float64 model, with
    other roundings: the same loss and gradients up to that float32 rounding."""
    assert compilation.BACKEND == "inductor"
    model, pairs = _model_and_pairs(tiny_model_dir, tokenizer, n=2, dtype=torch.float64)
    plain = _loss_and_gradients(SequenceScorer(model), pairs, tokenizer)
    scorer = SequenceScorer(model)
    compilation.compile_forward(scorer)
    compiled = _loss_and_gradients(scorer, pairs, tokenizer)
    torch.testing.assert_close(compiled["losses"], plain["losses"], atol=0, rtol=1e-6)
    for name, grad in plain["grads"].items():
        largest = grad.abs().max()
        assert largest > 0, name
        assert (compiled["grads"][name] - grad).abs().max() <= 3e-5 * largest, name


def _model_and_pairs(tiny_model_dir, tokenizer, n: int = 4, dtype=torch.float32):
    model = fresh_model(tiny_model_dir).to(dtype)
    disable_dropout(model)
    pairs, _ = make_pairs(tokenizer, n)
    fill_reference_logps(model, pairs, tokenizer.pad_token_id, 4, nullcontext, True)
    return model, pairs


def _loss_and_gradients(scorer, pairs, tokenizer) -> dict:
    """The IRFT loss of every pair (demonstrations and negatives of mixed lengths) and the
    gradient of their sum with respect to every parameter."""
    scorer.zero_grad()
    losses, _, _ = irft_loss_fn(0.3, "sigmoid", 0.5, tokenizer.pad_token_id)(scorer, pairs)
    losses.sum().backward()
    grads = {name: p.grad.clone() for name, p in scorer.lm.named_parameters()}
    return {"losses": losses.detach(), "grads": grads}


class Breaking(torch.nn.Module):
    """A training forward with one graph break (a host sync) and a Python flag that the loss
    flips once (a recompile)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.doubled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lm(x)
        if y.sum().item() > 1e9:  # .item(): Dynamo stops the graph here
            y = y + 1
        return 2 * y if self.doubled else y


def test_graph_breaks_and_recompiles_are_reported_once_with_their_reasons(monkeypatch, capsys):
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    config = IRFTConfig(model="m", data="d", cpu=True, show_progress=False, batch_size=2)
    accelerator = make_accelerator(config)
    log = MetricsLog(os.devnull, enabled=False)
    levers = Levers(compile_training=True)
    trainer = Trainer(config, torch.nn.Linear(3, 1), accelerator, log, Breaking, levers)
    calls = []

    def loss_fn(model, micro):
        calls.append(len(micro))
        model.doubled = len(calls) > 2  # from the third micro-batch on: a recompile
        per_item = model(torch.stack(micro)).squeeze(-1) ** 2
        return per_item, {}, torch.tensor(float(len(micro)))

    items = [torch.randn(3) for _ in range(10)]
    plan = FitPlan(loss_fn, lambda batch: float(len(batch)), 2, (0,), {})
    trainer.fit(items, plan)  # 2 epochs of 5 steps
    trainer.fit(items, plan)
    trainer.report_compile(finished=True)  # the run's end
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(REPORT)]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "1 recompile " in line and "in the first 3 training steps" in line, line
    assert "graph breaks: " in line and "item()" in line, line
    assert "recompiles: 1 x " in line and "doubled" in line, line
    assert not line.startswith(f"{REPORT} 0 graph breaks"), line


def test_nothing_to_report_in_a_short_fit_says_so_at_its_end(monkeypatch, capsys):
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    config = IRFTConfig(model="m", data="d", cpu=True, show_progress=False, batch_size=4)
    trainer = Trainer(
        config,
        torch.nn.Linear(3, 1),
        make_accelerator(config),
        MetricsLog(os.devnull, enabled=False),
        levers=Levers(compile_training=True),
        wrapper=_Plain,
    )

    def loss_fn(model, micro):
        return model(torch.stack(micro)).squeeze(-1) ** 2, {}, torch.tensor(1.0)

    trainer.fit([torch.randn(3) for _ in range(4)], FitPlan(loss_fn, len, 1, (0,), {}))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(REPORT)]
    assert lines == [f"{REPORT} 0 graph breaks and 0 recompiles in the first 1 training step"]


class _Plain(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(x)


def test_a_compiled_run_records_the_lever_and_saves_plain_weights(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    out = tmp_path / "run"
    train(small_run_config(SFTConfig, tiny_model_dir, out, compile_training="true", epochs=2))
    records = read_metrics(out)
    assert records[0]["event"] == "run_start" and records[0]["compile_training"] is True
    assert counters["stats"]["unique_graphs"] >= 1  # the run's forward was compiled
    assert all(r["loss"] > 0 for r in records if "step" in r)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(REPORT)]
    # The transformer alone is compiled: no graph break, and batches of new lengths reuse it.
    assert lines == [f"{REPORT} 0 graph breaks and 0 recompiles in the first 3 training steps"]
    names = set(fresh_model(tiny_model_dir).state_dict())
    final = load_file(out / "final" / "model.safetensors")
    assert final and set(final) <= names  # a tied head may be saved once
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints
    for folder in checkpoints:
        state = torch.load(folder / "policy.pt", weights_only=True)
        assert set(state["model"]) == names, folder  # no `_orig_mod.` prefix
