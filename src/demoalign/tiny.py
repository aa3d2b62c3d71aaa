"""Tiny models for tests and trials: a small random causal LM with a real tokenizer.

Nothing is downloaded. The tokenizer is either a byte-level BPE trained here in a fraction of a
second (default: a small vocabulary keeps a CPU model fast) or one of the real tokenizer files
under $DEMOALIGN_DATA/tokenizers (GPT-2 / GPT-NeoX, 50k vocabulary, slow on CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .data.sources import data_root

SPECIAL_EOS = "<|endoftext|>"
SPECIAL_PAD = "<|pad|>"

# A few lines of varied English so that a trained BPE has real merges; bytes cover the rest.
BUILTIN_CORPUS = """\
Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, knead the dough,
let it rise for an hour, shape it, and bake it at 220 degrees for about thirty minutes.
### Instruction: Sort the digits 3 1 2. ### Response: 1 2 3
### Instruction: Add 12 and 30. ### Response: 42
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Please explain what a neural network is, in simple words, for a student who is new to the topic.
Question: What is the capital of France? Answer: The capital of France is Paris.
I am sorry, but I cannot help with that request. Is there anything else I can do for you today?
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 ( ) [ ] { } < > + - * / = , . ; : ! ?
"""

REAL_TOKENIZERS = {
    "gpt2": "tokenizers/gpt2/gpt2.json",
    "neox": "tokenizers/gpt-neox-20b/20B_tokenizer.json",
}


def _wrap(tokenizer_object):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, eos_token=SPECIAL_EOS, pad_token=SPECIAL_PAD
    )
    tok.padding_side = "right"
    return tok


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE trained in-process on `texts` (default: a built-in corpus)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_EOS, SPECIAL_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or BUILTIN_CORPUS.splitlines(), trainer=trainer)
    return _wrap(tokenizer)


def real_tokenizer(name: str):
    """GPT-2 or GPT-NeoX tokenizer from the shared data files."""
    if name not in REAL_TOKENIZERS:
        raise ValueError(
            f"unknown tokenizer {name!r}; choose trained, {', '.join(REAL_TOKENIZERS)}"
        )
    path = data_root() / REAL_TOKENIZERS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (DEMOALIGN_DATA must hold tokenizers/)")
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([SPECIAL_PAD])
    return _wrap(tok)


def tiny_model(
    tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
):
    """A random Llama-shaped causal LM (no dropout layers) sized to the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_tiny_model(
    out_dir: str | Path,
    tokenizer: str = "trained",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    corpus: list[str] | None = None,
) -> Path:
    """Write a tiny model and its tokenizer to `out_dir` (loadable with `model=out_dir`)."""
    tok = (
        train_tokenizer(corpus, vocab_size) if tokenizer == "trained" else real_tokenizer(tokenizer)
    )
    model = tiny_model(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
