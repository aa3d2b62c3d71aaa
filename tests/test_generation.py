import math
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from conftest import fresh_model
from demoalign.config import IRFTConfig
from demoalign.generation import (
    GenerationEngine,
    SamplingOptions,
    Share,
    generate_ids,
    sampling_config,
    strip_after_eos,
)

_OPTIONS = {f.name for f in fields(SamplingOptions)}
_SHARE = {f.name for f in fields(Share)}


def gen(model, tokenizer, ids, engine=None, return_logps=False, **settings):
    """`generate_ids` with its options as keywords; a fresh engine unless one is given."""
    options = SamplingOptions(**{k: v for k, v in settings.items() if k in _OPTIONS})
    share = Share(**{k: v for k, v in settings.items() if k in _SHARE})
    assert set(settings) <= _OPTIONS | _SHARE, set(settings) - _OPTIONS - _SHARE
    if engine is not None:
        return generate_ids(
            engine, model, tokenizer, ids, options, share, return_logps=return_logps
        )
    with GenerationEngine() as own:
        return generate_ids(own, model, tokenizer, ids, options, share, return_logps=return_logps)


PROMPTS = [
    "### Instruction: sort 3 1 2\n\n### Response: ",
    "Hello",
    "### Instruction: add 12 and 30, then explain\n\n### Response: ",
]


def _prompt_ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def test_default_config_samples_at_temperature_one_without_top_k(tokenizer):
    defaults = IRFTConfig()
    assert defaults.greedy is False and defaults.temperature == 1.0 and defaults.top_p == 1.0
    config = sampling_config(tokenizer, 8, defaults.temperature, defaults.top_p, defaults.greedy)
    assert config.do_sample is True
    assert config.top_k in (0, None)
    assert sampling_config(tokenizer, 8, 1.0, 1.0, greedy=True).do_sample is False


def test_sampled_differs_by_seed_greedy_does_not(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    ids = _prompt_ids(tokenizer)
    common = dict(max_new_tokens=12, show_progress=False)
    a = gen(model, tokenizer, ids, seed=1, **common)
    b = gen(model, tokenizer, ids, seed=2, **common)
    again = gen(model, tokenizer, ids, seed=1, **common)
    assert a == again, "same seed must give the same negatives"
    assert a != b, "default generation must sample"
    g1 = gen(model, tokenizer, ids, seed=1, greedy=True, **common)
    g2 = gen(model, tokenizer, ids, seed=2, greedy=True, **common)
    assert g1 == g2
    # Greedy's first token is the argmax after the prompt: left padding did not change it.
    with torch.no_grad():
        first = model(torch.tensor([ids[1]])).logits[0, -1].argmax().item()
    assert g1[1][0] == first


def test_negatives_do_not_depend_on_process_count(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    ids = _prompt_ids(tokenizer) * 3
    common = dict(max_new_tokens=6, batch_size=2, seed=5, show_progress=False)
    single = gen(model, tokenizer, ids, **common)
    shard0 = gen(model, tokenizer, ids, process_index=0, num_processes=2, **common)
    shard1 = gen(model, tokenizer, ids, process_index=1, num_processes=2, **common)
    assert not set(shard0) & set(shard1)
    assert {**shard0, **shard1} == single


def test_strip_after_eos_cuts_after_the_first_eos_only():
    assert strip_after_eos([5, 6, 0, 1, 1], eos_id=0) == [5, 6, 0]
    # No EOS: the row never finished, so transformers padded none of it: pad ids (1) at its end
    # were sampled and stay; an all-pad sample is not an empty one.
    assert strip_after_eos([5, 6, 1, 1], eos_id=0) == [5, 6, 1, 1]
    assert strip_after_eos([1, 1], eos_id=0) == [1, 1]
    assert strip_after_eos([5, 6, 7], eos_id=0) == [5, 6, 7]


@pytest.mark.parametrize("backend", ("hf", "static"))
def test_a_sampled_pad_token_is_kept_when_pad_differs_from_eos(tiny_model_dir, tokenizer, backend):
    """A row that never produced EOS keeps every token it generated, even the ones equal to
    the pad id: only a finished row is padded (after its EOS)."""
    model = fresh_model(tiny_model_dir)
    ids = _prompt_ids(tokenizer)
    common = dict(max_new_tokens=8, greedy=True, batch_size=2, show_progress=False)
    plain = gen(model, tokenizer, ids, backend=backend, **common)
    row = next(i for i, out in plain.items() if tokenizer.eos_token_id not in out)
    last = plain[row][-1]
    assert last not in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    # The same model with its last greedy token as pad id: the samples do not change.
    tok = SimpleNamespace(eos_token_id=tokenizer.eos_token_id, pad_token_id=last)
    assert gen(model, tok, ids, backend=backend, **common) == plain


def test_the_models_own_generation_config_does_not_leak_into_sampling(tiny_model_dir, tokenizer):
    ids = _prompt_ids(tokenizer)
    plain = fresh_model(tiny_model_dir)
    tweaked = fresh_model(tiny_model_dir)
    tweaked.generation_config.repetition_penalty = 5.0
    tweaked.generation_config.no_repeat_ngram_size = 1
    tweaked.generation_config.top_k = 3
    common = dict(max_new_tokens=12, seed=3, show_progress=False)
    assert gen(tweaked, tokenizer, ids, **common) == gen(plain, tokenizer, ids, **common)
    assert tweaked.generation_config.repetition_penalty == 5.0, "the model's own config is restored"


# ---------------------------------------------------------------- engines: hf and static

from demoalign.generation import auto_batch_size, parse_batch_size  # noqa: E402
from demoalign.logprobs import token_logps  # noqa: E402

ENGINES = ("hf", "static")


def _mixed_prompts(tokenizer):
    long = "### Instruction: " + "explain the quick brown fox and the lazy dog " * 6
    return _prompt_ids(tokenizer) + [tokenizer(long)["input_ids"], tokenizer("Hi")["input_ids"]]


def test_static_engine_greedy_equals_hf_on_mixed_lengths(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    ids = _mixed_prompts(tokenizer)
    assert len({len(p) for p in ids}) == len(ids) and max(map(len, ids)) > 4 * min(map(len, ids))
    for batch_size in (2, 64):  # several batches; one batch larger than the prompts
        common = dict(max_new_tokens=10, greedy=True, batch_size=batch_size, show_progress=False)
        hf = gen(model, tokenizer, ids, backend="hf", **common)
        static = gen(model, tokenizer, ids, backend="static", **common)
        assert static == hf and sorted(hf) == list(range(len(ids)))
        assert all(len(v) == 10 for v in hf.values())


def test_eos_at_the_first_step_ends_that_row_in_both_engines(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    ids = _mixed_prompts(tokenizer)
    with torch.no_grad():
        first = model(torch.tensor([ids[0]])).logits[0, -1].argmax().item()
    # The greedy first token of prompt 0 is made the EOS: that row must be exactly [EOS].
    tok = SimpleNamespace(eos_token_id=first, pad_token_id=tokenizer.pad_token_id)
    common = dict(max_new_tokens=8, greedy=True, batch_size=3, show_progress=False)
    hf = gen(model, tok, ids, backend="hf", **common)
    static = gen(model, tok, ids, backend="static", **common)
    assert hf[0] == [first]
    assert static == hf


@pytest.mark.parametrize("backend", ENGINES)
def test_same_seed_same_samples_and_logps_do_not_change_them(tiny_model_dir, tokenizer, backend):
    model = fresh_model(tiny_model_dir)
    ids = _mixed_prompts(tokenizer)
    common = dict(
        max_new_tokens=12,
        batch_size=2,
        temperature=0.8,
        top_p=0.9,
        show_progress=False,
        backend=backend,
    )
    a = gen(model, tokenizer, ids, seed=4, **common)
    again, logps = gen(model, tokenizer, ids, seed=4, return_logps=True, **common)
    other = gen(model, tokenizer, ids, seed=5, **common)
    assert a == again
    assert a != other
    assert {i: len(v) for i, v in logps.items()} == {i: len(v) for i, v in a.items()}


@pytest.mark.parametrize("backend", ENGINES)
def test_decode_logps_equal_forward_logps_in_fp32(tiny_model_dir, tokenizer, backend):
    """Sampled at T=0.7, top-p 0.9: the recorded log-probs are still the model's own (T=1)."""
    model = fresh_model(tiny_model_dir)
    ids = _mixed_prompts(tokenizer)
    out, logps = gen(
        model,
        tokenizer,
        ids,
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        seed=1,
        batch_size=2,
        show_progress=False,
        backend=backend,
        return_logps=True,
    )
    for i, prompt in enumerate(ids):
        seq = torch.tensor([prompt + out[i]])
        labels = seq.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            forward = token_logps(model(seq).logits, labels)[0, len(prompt) - 1 :]
        assert forward.shape[0] == len(logps[i]) > 0
        assert torch.allclose(forward, torch.tensor(logps[i]), atol=1e-4), (i, forward, logps[i])


def _chi_square_rejects(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at p = 1e-3, cells with an expected count under 5 pooled. The quantile is
    Wilson-Hilferty's approximation (no scipy at run time)."""
    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    if (counts[expected == 0] > 0).any():
        return True
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    dof = int(keep.sum().item()) - 1
    z = 3.09  # one-sided 0.999 normal quantile
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat > critical


@pytest.fixture(scope="module")
def peaked_model():
    """A one-layer model over 96 tokens whose next-token logits spread over several nats, so that
    a wrong temperature or a top-50 cut moves the distribution visibly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompt = [5, 17, 33, 2]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
        model.lm_head.weight.mul_(2.5 / logits.std())
        logits = model(torch.tensor([prompt])).logits[0, -1]
    return model, prompt, logits


@pytest.mark.parametrize("backend", ENGINES)
def test_sample_frequencies_match_softmax_over_temperature(peaked_model, backend):
    model, prompt, logits = peaked_model
    tok = SimpleNamespace(eos_token_id=0, pad_token_id=1)
    temperature, n = 0.8, 6000
    out = gen(
        model,
        tok,
        [prompt] * n,
        max_new_tokens=1,
        temperature=temperature,
        seed=11,
        batch_size=1500,
        show_progress=False,
        backend=backend,
    )
    counts = torch.bincount(torch.tensor([out[i][0] for i in range(n)]), minlength=96)
    probs = torch.softmax(logits / temperature, -1)
    assert not _chi_square_rejects(counts, probs), "samples do not follow softmax(logits / T)"
    # The test has power: the same samples reject a 25% wrong temperature and a top-50 leak.
    assert _chi_square_rejects(counts, torch.softmax(logits / (temperature * 1.25), -1))
    assert _chi_square_rejects(counts, torch.softmax(logits / (temperature / 1.25), -1))
    top50 = (logits / temperature).masked_fill(logits < logits.topk(50).values[-1], float("-inf"))
    assert _chi_square_rejects(counts, torch.softmax(top50, -1))


def test_batch_size_settings():
    assert parse_batch_size("auto") is None
    assert parse_batch_size(8) == 8 and parse_batch_size("32") == 32
    for bad in (0, "0", "-3", "x", "1.5", True):
        with pytest.raises(ValueError):
            parse_batch_size(bad)
    model = torch.nn.Linear(2, 2)  # off CUDA, `auto` is the CPU default, capped by the prompts
    assert auto_batch_size(model, 100, 10, 10) == 16 and auto_batch_size(model, 3, 10, 10) == 3


def test_the_half_copy_is_refreshed_in_place_and_freed_between_calls(
    tiny_model_dir, tokenizer, monkeypatch
):
    """What CUDA does by default, forced on CPU: generation runs on a bf16 copy whose tensors
    (so a compiled graph's inputs) stay the same objects while their storage is released after
    every call and refilled from the current training weights at the next."""
    import copy

    from demoalign.generation import engine as engine_module

    monkeypatch.setattr(engine_module, "wants_half_copy", lambda model: True)  # CUDA's choice
    model = fresh_model(tiny_model_dir)
    generation_engine = GenerationEngine()
    engine = generation_engine.static_engine(model)
    assert engine.half
    tensors = list(engine.model.parameters())
    assert {p.dtype for p in tensors} == {torch.bfloat16}
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight, "ties kept"
    ids = _mixed_prompts(tokenizer)
    common = dict(max_new_tokens=6, greedy=True, batch_size=2, show_progress=False)
    gen(model, tokenizer, ids, generation_engine, backend="static", **common)
    assert engine.released and all(p.untyped_storage().nbytes() == 0 for p in tensors)
    with torch.no_grad():  # a training step
        for p in model.parameters():
            p.mul_(0.5)
    half = copy.deepcopy(model).to(torch.bfloat16)
    expected = gen(half, tokenizer, ids, backend="hf", **common)
    assert gen(model, tokenizer, ids, generation_engine, backend="static", **common) == expected
    engine.refresh()
    assert list(engine.model.parameters()) == tensors and all(
        a is b for a, b in zip(engine.model.parameters(), tensors)
    )
    for dst, src in zip(tensors, model.parameters()):
        assert torch.equal(dst, src.detach().to(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.float32}, (
        "the training weights stay fp32"
    )
    generation_engine.close()
    assert engine.model is None and engine.source is None, "close drops the copy"
    assert all(p.untyped_storage().nbytes() == 0 for p in tensors)
    with pytest.raises(RuntimeError, match="closed"):
        gen(model, tokenizer, ids, generation_engine, backend="static", **common)


def test_hf_batches_are_not_padded_with_extra_rows(tiny_model_dir, tokenizer, monkeypatch):
    """Only a compiled graph needs one batch shape. Extra rows in a plain batch would draw random
    numbers of their own and change the samples of the real rows (a short last batch)."""
    from demoalign.generation import engine as engine_module

    shapes = []
    real = engine_module._generate_batch

    def recording(call, input_ids, *args):
        shapes.append(input_ids.shape[0])
        return real(call, input_ids, *args)

    monkeypatch.setattr(engine_module, "_generate_batch", recording)
    prompts = [tokenizer(f"sort: {i} 2 1\n")["input_ids"] for i in range(6)]
    for backend in ("hf", "static"):  # static is uncompiled on CPU
        shapes.clear()
        gen(
            fresh_model(tiny_model_dir),
            tokenizer,
            prompts,
            max_new_tokens=3,
            batch_size=4,
            seed=1,
            show_progress=False,
            backend=backend,
        )
        assert shapes == [4, 2], backend


def test_gathered_samples_must_cover_every_prompt_once():
    from demoalign.generation import check_one_each

    check_one_each([0, 1, 2], 3, "negatives")
    for wrong in ([0, 1], [0, 1, 1, 2], [0, 2, 1, 3]):
        with pytest.raises(RuntimeError, match="different batches"):
            check_one_each(wrong, 3, "negatives")


def test_an_engine_outlives_its_model_for_the_next_one_of_the_same_architecture(
    tiny_model_dir, tokenizer, monkeypatch, tmp_path
):
    """A sweep of runs in one process, sharing one GenerationEngine: when a model is finished its
    bf16 copy (and so, on CUDA, its compiled decode step) serves the next model of the same
    architecture, with that model's weights; a model of another architecture gets a static
    engine of its own. Nothing is handed over before the caller says the model is done."""
    import copy

    from demoalign.generation import engine as engine_module
    from demoalign.tiny import make_tiny_model

    monkeypatch.setattr(engine_module, "wants_half_copy", lambda model: True)  # CUDA's choice
    ids = _mixed_prompts(tokenizer)
    common = dict(max_new_tokens=6, greedy=True, batch_size=2, show_progress=False)
    generation_engine = GenerationEngine()
    first = fresh_model(tiny_model_dir)
    settings = {**common, "max_new_tokens": 70}
    gen(first, tokenizer, ids, generation_engine, backend="static", **settings)
    engine = generation_engine.static_engine(first)
    long_cache = engine.model._previous_max_cache_length
    copy_tensors = [id(p) for p in engine.model.parameters()]
    assert generation_engine.idle is None, "parked before the model was finished"
    generation_engine.finish(first)
    assert generation_engine.idle is engine and engine.released and engine.source is None
    del first

    second = fresh_model(tiny_model_dir)
    with torch.no_grad():  # other weights than the first model's
        for p in second.parameters():
            p.mul_(0.5)
    with generation_engine.for_model(second):
        got = gen(second, tokenizer, ids, generation_engine, backend="static", **common)
        assert generation_engine.static_engine(second) is engine
        assert generation_engine.idle is None
        assert [id(p) for p in engine.model.parameters()] == copy_tensors
        assert engine.model._previous_max_cache_length < long_cache, "a cache sized by the last run"
    half = copy.deepcopy(second).to(torch.bfloat16)
    assert got == gen(half, tokenizer, ids, backend="hf", **common)
    assert generation_engine.idle is engine, "for_model parks the copy at the end of its block"
    del second

    wider = fresh_model(make_tiny_model(tmp_path / "wider", vocab_size=384, hidden_size=48))
    assert generation_engine.static_engine(wider) is not engine
    assert generation_engine.idle is engine, "the idle engine waits for its own architecture"
    generation_engine.finish_all()
    assert generation_engine.idle is not engine, "the wider model's copy is the idle one now"
    assert engine.model is None, "the copy it replaced is closed"
    generation_engine.close()
    assert generation_engine.idle is None


def test_without_a_half_copy_nothing_waits_for_the_next_model(tiny_model_dir, tokenizer):
    """On CPU (and for bf16 or peft models) the static engine generates on the model itself: a
    finished model's engine is dropped, not parked, and holds no reference to the model."""
    ids = _mixed_prompts(tokenizer)
    common = dict(max_new_tokens=4, greedy=True, batch_size=2, show_progress=False)
    with GenerationEngine() as generation_engine:
        model = fresh_model(tiny_model_dir)
        gen(model, tokenizer, ids, generation_engine, backend="static", **common)
        engine = generation_engine.static_engine(model)
        assert not engine.half and engine.target() is model
        generation_engine.finish(model)
        assert generation_engine.idle is None and engine.source is None
        assert generation_engine.static_engine(model) is not engine


def test_a_sweep_passes_one_engine_to_its_runs_and_the_second_adopts_the_first_copy(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`train(config, engine=engine)`: the run finishes its model on the caller's engine at its
    end (its bf16 copy parked, the engine left open), and the next run's model of the same
    architecture generates on that same copy. A run given no engine closes its own."""
    from conftest import small_run_config
    from demoalign import train
    from demoalign.generation import engine as engine_module

    monkeypatch.setattr(engine_module, "wants_half_copy", lambda model: True)  # CUDA's choice
    served = []
    real = engine_module.GenerationEngine.static_engine

    def recording(self, model):
        static = real(self, model)
        served.append((self, static, [id(p) for p in static.model.parameters()]))
        return static

    monkeypatch.setattr(engine_module.GenerationEngine, "static_engine", recording)
    with GenerationEngine() as sweep:
        for k in (1, 2):
            config = small_run_config(
                IRFTConfig, tiny_model_dir, tmp_path / str(k), generation_backend="static"
            )
            train(config, engine=sweep)
            assert not sweep.closed and sweep.idle is not None and sweep.idle.source is None
            assert sweep.idle.released
    assert len(served) == 4 and all(engine is sweep for engine, _, _ in served)  # 2 stages × 2
    assert len({id(static) for _, static, _ in served}) == 1, "the second run built a new copy"
    assert len({tuple(ids) for _, _, ids in served}) == 1, "the copy's tensors changed"
    assert sweep.closed and sweep.idle is None

    served.clear()
    train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "3", generation_backend="static"))
    own = served[0][0]
    assert own is not sweep and own.closed, "a run's own engine is closed at its end"
