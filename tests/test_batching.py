"""Truncation, stage chunks, the lr schedule, micro-batch sharding, dropout, dtype."""

from types import SimpleNamespace

import pytest
import torch

from conftest import fresh_model
from demoalign.batching import Encoder, Tokenized, collate
from demoalign.data import Example
from demoalign.logprobs import IGNORE_INDEX
from demoalign.methods import stage_chunks
from demoalign.trainer import Trainer, disable_dropout, lr_factor


class CharTokenizer:
    """One id per character, BOS = 1 prepended, EOS = 2: lengths are easy to reason about."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_prompt_cut_from_the_left_keeping_bos_and_response_cut_to_fit():
    enc = Encoder(CharTokenizer(), "plain", max_length=10, max_prompt_length=4)
    t = enc.encode(Example("abcdef", "xyz"))
    # plain renders "abcdef\n": BOS + 7 chars, cut from the left to BOS + last 3 ("ef\n").
    assert t.prompt_ids == [1, ord("e"), ord("f"), ord("\n")]
    assert t.response_ids == [ord("x"), ord("y"), ord("z"), 2], "the response keeps its EOS"
    long = enc.encode(Example("ab", "0123456789"))
    assert len(long.prompt_ids) + len(long.response_ids) == 10
    assert long.response_ids == [ord(c) for c in "012345"], "cut from the right to fit max_length"
    assert enc.counts.as_dict() == {"prompts_truncated": 1, "responses_truncated": 1, "sequences": 2}


def test_collate_labels_only_the_response():
    batch = collate([Tokenized([5, 6], [7, 2]), Tokenized([5], [2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 2], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]]


def test_stage_chunks_are_disjoint_cover_the_data_and_reshuffle_per_iteration():
    chunks = stage_chunks(103, 4, seed=3, iteration=0)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(103))
    assert [len(c) for c in chunks] == [25, 26, 26, 26]
    assert stage_chunks(103, 4, seed=3, iteration=1) != chunks
    assert stage_chunks(103, 4, seed=3, iteration=0) == chunks


def test_lr_schedule_by_hand():
    f = lr_factor(10, 0.2, "linear")  # 2 warm-up steps, then 8 decay steps
    assert [round(f(k), 4) for k in range(10)] == [0.3333, 0.6667, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lr_factor(5, 0.0, "linear")(0) == 1.0, "no warm-up: the first step runs at the peak lr"
    assert [lr_factor(4, 0.5, "constant")(k) for k in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]


def test_a_process_without_items_runs_one_with_weight_zero():
    def shard(rank, world, batch, batch_size=2):
        fake = SimpleNamespace(accelerator=SimpleNamespace(num_processes=world, process_index=rank),
                               config=SimpleNamespace(batch_size=batch_size))
        return Trainer._my_micro_batches(fake, batch)

    assert shard(0, 2, ["a", "b", "c"]) == ([["a", "c"]], 1.0)
    assert shard(1, 2, ["a", "b", "c"]) == ([["b"]], 1.0)
    assert shard(1, 2, ["a"]) == ([["a"]], 0.0)
    assert shard(0, 1, list("abcde")) == ([["a", "b"], ["c", "d"], ["e"]], 1.0)


def test_disable_dropout_covers_float_attention_dropout(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.manual_seed(0)
    a = model(ids).logits
    b = model(ids).logits
    assert not torch.allclose(a, b), "the fixture must have active attention dropout"
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_weights_load_in_float32_from_a_bf16_checkpoint(tiny_model_dir, tmp_path):
    from demoalign.run import load_model_and_tokenizer

    model = fresh_model(tiny_model_dir).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16").joinpath("tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "bf16").joinpath("tokenizer_config.json").write_bytes((tiny_model_dir / "tokenizer_config.json").read_bytes())
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


@pytest.mark.parametrize("key, value", [("beta", "0"), ("top_p", "1.5"), ("temperature", "0")])
def test_generation_and_loss_settings_are_checked_early(key, value):
    from demoalign.config import IRFTConfig, load_config

    with pytest.raises(ValueError, match=key):
        load_config(IRFTConfig, None, ["model=m", "data=d", f"{key}={value}"])
