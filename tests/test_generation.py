import torch

from conftest import fresh_model
from demoalign.config import IRFTConfig
from demoalign.generation import _strip_after_eos, generate_ids, sampling_config

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
    a = generate_ids(model, tokenizer, ids, seed=1, **common)
    b = generate_ids(model, tokenizer, ids, seed=2, **common)
    again = generate_ids(model, tokenizer, ids, seed=1, **common)
    assert a == again, "same seed must give the same negatives"
    assert a != b, "default generation must sample"
    g1 = generate_ids(model, tokenizer, ids, seed=1, greedy=True, **common)
    g2 = generate_ids(model, tokenizer, ids, seed=2, greedy=True, **common)
    assert g1 == g2
    # Greedy's first token is the argmax after the prompt: left padding did not change it.
    with torch.no_grad():
        first = model(torch.tensor([ids[1]])).logits[0, -1].argmax().item()
    assert g1[1][0] == first


def test_negatives_do_not_depend_on_process_count(tiny_model_dir, tokenizer):
    model = fresh_model(tiny_model_dir)
    ids = _prompt_ids(tokenizer) * 3
    common = dict(max_new_tokens=6, batch_size=2, seed=5, show_progress=False)
    single = generate_ids(model, tokenizer, ids, **common)
    shard0 = generate_ids(model, tokenizer, ids, process_index=0, num_processes=2, **common)
    shard1 = generate_ids(model, tokenizer, ids, process_index=1, num_processes=2, **common)
    assert not set(shard0) & set(shard1)
    assert {**shard0, **shard1} == single


def test_strip_after_eos():
    assert _strip_after_eos([5, 6, 0, 1, 1], eos_id=0, pad_id=1) == [5, 6, 0]
    assert _strip_after_eos([5, 6, 1, 1], eos_id=0, pad_id=1) == [5, 6]
    assert _strip_after_eos([5, 6, 7], eos_id=0, pad_id=0) == [5, 6, 7]


def test_the_models_own_generation_config_does_not_leak_into_sampling(tiny_model_dir, tokenizer):
    ids = _prompt_ids(tokenizer)
    plain = fresh_model(tiny_model_dir)
    tweaked = fresh_model(tiny_model_dir)
    tweaked.generation_config.repetition_penalty = 5.0
    tweaked.generation_config.no_repeat_ngram_size = 1
    tweaked.generation_config.top_k = 3
    common = dict(max_new_tokens=12, seed=3, show_progress=False)
    assert generate_ids(tweaked, tokenizer, ids, **common) == generate_ids(
        plain, tokenizer, ids, **common
    )
    assert tweaked.generation_config.repetition_penalty == 5.0, "the model's own config is restored"
