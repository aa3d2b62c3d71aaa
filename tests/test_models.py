"""Model loading."""

import torch

from conftest import fresh_model


def test_weights_load_in_float32_from_a_bf16_checkpoint(tiny_model_dir, tmp_path):
    from demoalign.models import load_model_and_tokenizer

    model = fresh_model(tiny_model_dir).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16").joinpath("tokenizer.json").write_bytes(
        (tiny_model_dir / "tokenizer.json").read_bytes()
    )
    (tmp_path / "bf16").joinpath("tokenizer_config.json").write_bytes(
        (tiny_model_dir / "tokenizer_config.json").read_bytes()
    )
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_rfts_reward_model_says_in_one_line_which_weights_are_new(tiny_model_dir, capfd):
    from demoalign.models import load_reward_model

    model, _ = load_reward_model(str(tiny_model_dir), seed=3)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err  # transformers' table
    lines = [line for line in err.splitlines() if line.startswith("demoalign: reward model")]
    assert len(lines) == 1 and "new weights score.weight" in lines[0], err
    again, _ = load_reward_model(str(tiny_model_dir), seed=3)
    torch.testing.assert_close(model.score.weight, again.score.weight, rtol=0, atol=0)
