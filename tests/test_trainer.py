"""The one training loop: schedule, process shares, dropout."""

from types import SimpleNamespace

import torch

from demoalign.trainer import Levers, Trainer, disable_dropout, lr_factor


def test_lr_schedule_by_hand():
    f = lr_factor(10, 0.2, "linear")  # 2 warm-up steps, then 8 decay steps
    assert [round(f(k), 4) for k in range(10)] == [
        0.3333,
        0.6667,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
    ]
    assert lr_factor(5, 0.0, "linear")(0) == 1.0, "no warm-up: the first step runs at the peak lr"
    assert [lr_factor(4, 0.5, "constant")(k) for k in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]


def test_a_process_without_items_runs_one_with_weight_zero():
    def shard(rank, world, batch, batch_size=2):
        fake = SimpleNamespace(
            accelerator=SimpleNamespace(num_processes=world, process_index=rank),
            config=SimpleNamespace(batch_size=batch_size),
            levers=Levers(),  # fixed micro-batches of batch_size items
            padding_free=False,
        )
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
