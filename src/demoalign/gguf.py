"""GGUF checkpoints (llama.cpp's single-file format) as start models.

`model=` may name a `.gguf` file or a folder holding exactly one: the weights are dequantised to
float32 on load (training needs dense weights) and the tokenizer, special tokens and chat template
are read from the file's metadata. `convert_gguf` writes the same model as a normal Hugging Face
folder, which loads faster and needs no `gguf` package afterwards.

    demoalign convert IN.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .runio import save_pretrained_atomic

GGUF_EXTRA = "demoalign[gguf]"
GGUF_SUFFIX = ".gguf"


def find_gguf(path: str | Path) -> Path | None:
    """The `.gguf` file that `path` names: the file itself, or the only one in a folder.

    None when `path` is anything else (a Hugging Face folder, a hub id, a missing folder); a
    missing `.gguf` file is an error. A folder with a `config.json` is a Hugging Face checkpoint
    even if a `.gguf` lies beside it: the explicit config wins. A folder with several `.gguf`
    files is an error, not a guess.
    """
    p = Path(path)
    if p.suffix.lower() == GGUF_SUFFIX and not p.exists():
        # Clearer than the hub lookup `from_pretrained` would otherwise attempt with the name.
        raise FileNotFoundError(f"{p} not found")
    if p.is_file():
        return p if p.suffix.lower() == GGUF_SUFFIX else None
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ValueError(f"{p} holds several .gguf files ({names}); name one of them as model=")
    return found[0] if found else None


def require_gguf_package() -> None:
    """transformers reads GGUF files through the `gguf` package, an optional dependency."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"loading a .gguf model needs the `gguf` package: pip install '{GGUF_EXTRA}' "
            "(or pip install gguf==0.19.0)"
        )


def _clear_quantization_marker(model) -> None:
    """Make a dequantised GGUF model an ordinary float model.

    transformers 5 loads a GGUF through its GGUF quantizer. Unless dequantisation is asked for
    explicitly, the quantizer stays attached (`model.hf_quantizer`, `config.quantization_config`)
    even when every weight is already a dense float tensor (llama goes through the legacy loader,
    which always dequantises). That quantizer declares itself neither serializable nor trainable:
    `save_pretrained` refuses the model, and a saved config would claim a quantisation the weights
    no longer have. Its own `remove_quantization_config` is the supported way to drop it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_gguf(path: str | Path):
    """(model, tokenizer) from a `.gguf` file or a folder holding one, float32, trainable."""
    file = find_gguf(path)
    if file is None:
        raise ValueError(f"{path} is neither a .gguf file nor a folder holding exactly one")
    require_gguf_package()
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers releases before the GGUF quantizer always dequantise
        extra = {}
    else:
        # Dense float32 weights, as training needs, even for architectures whose blocks
        # transformers would otherwise keep packed; with this, transformers also drops the
        # quantizer itself once the weights are in.
        extra = {"quantization_config": GgufConfig(dequantize=True)}
    folder, name = str(file.parent), file.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **extra
    )
    _clear_quantization_marker(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def convert_gguf(src: str | Path, out_dir: str | Path) -> Path:
    """Write the dequantised model of `src` and its tokenizer (chat template included) to
    `out_dir` as a normal Hugging Face folder (safetensors, float32)."""
    model, tokenizer = load_gguf(src)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Into a temporary folder, then renamed: an interrupted conversion leaves no half folder.
    save_pretrained_atomic(model, tokenizer, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demoalign convert",
        description="Convert a .gguf model to a Hugging Face folder (weights dequantised).",
    )
    parser.add_argument("src", help="a .gguf file, or a folder holding exactly one")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    out = convert_gguf(args.src, args.out_dir)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
