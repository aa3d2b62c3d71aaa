"""Model loading."""

import torch

from conftest import fresh_model


class CharTokenizer:
    """One id per character, BOS = 1 prepended, EOS = 2: lengths are easy to reason about."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


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
