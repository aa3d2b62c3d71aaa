"""Tiny models for tests and trials: a small random causal LM with a real tokenizer.

Nothing is downloaded. The tokenizer is either a byte-level BPE trained here in a fraction of a
second (default: a small vocabulary keeps a CPU model fast) or one of the real tokenizer files
under $DEMOALIGN_DATA/tokenizers (GPT-2 / GPT-NeoX, 50k vocabulary, slow on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    return tokenizer_from_file(path)


def tokenizer_from_file(path: str | Path):
    """A tokenizer.json file as a tokenizer of tiny models (its EOS, a pad token added)."""
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([SPECIAL_PAD])
    return _wrap(tok)


@dataclass
class TinyShape:
    """The shape of a tiny Llama. vocab_size None: the tokenizer's size (a larger one pads the
    embedding); intermediate_size None: twice the hidden size."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_positions: int = 1024
    tie_word_embeddings: bool = True


def tiny_llama(tokenizer, shape: TinyShape, seed: int = 0, device=None):
    """A random Llama-shaped causal LM (no dropout layers) of `shape`, its special tokens the
    tokenizer's; built on `device` (a random init on a GPU takes seconds, not a minute)."""
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), shape.vocab_size or 0),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size or shape.hidden_size * 2,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    if device is None:
        return LlamaForCausalLM(config)
    with torch.device(device):
        return LlamaForCausalLM(config)


def tiny_model(
    tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
):
    """A random Llama-shaped causal LM (no dropout layers) sized to the tokenizer."""
    return tiny_llama(tokenizer, TinyShape(hidden_size, num_layers, num_heads), seed)


def save_tiny_model(out_dir: str | Path, tokenizer, shape: TinyShape, seed: int = 0) -> Path:
    """Write a tiny model of `shape` and `tokenizer` to `out_dir` (loadable with model=out_dir)."""
    model = tiny_llama(tokenizer, shape, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_model(
    out_dir: str | Path,
    tokenizer: str = "trained",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    corpus: list[str] | None = None,
) -> Path:
    """Write a tiny model and its tokenizer (`trained` on `corpus`, or a real one by name) to
    `out_dir` (loadable with `model=out_dir`)."""
    tok = (
        train_tokenizer(corpus, vocab_size) if tokenizer == "trained" else real_tokenizer(tokenizer)
    )
    return save_tiny_model(out_dir, tok, TinyShape(hidden_size, num_layers), seed)


# A ChatML chat template, `<|im_end|>` as EOS and no pad token: where a tiny model should take the
# template and padding paths of a ChatML chat model such as SmolLM2 (as transformers loads it).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """`train_tokenizer` made a ChatML chat tokenizer (see CHATML)."""
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = None
    tokenizer.chat_template = CHATML
    return tokenizer
