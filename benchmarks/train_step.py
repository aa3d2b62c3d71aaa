"""Training-step throughput and peak memory: demoalign IRFT vs TRL's DPOTrainer, one run.

Both sides train the same tiny Llama-shaped model (same initial weights) on the same pairs, in the
same order, with AdamW, the same learning rate (constant), batch size, grad clipping (1.0), beta
and sigmoid loss, for the same number of optimiser steps:

- ours: the reference log-probs are computed ONCE, by the same model, before training (as IRFT does
  at every stage start; timed separately, not part of tokens/s), then `Trainer.step` with
  `irft_loss_fn`: one forward/backward over [demonstrations; negatives] per step.
- TRL: `DPOTrainer` with a reference model (a deepcopy of the initial model) held in memory and a
  reference forward at every step (its default, `precompute_ref_log_probs=False`).

Each side runs in its own subprocess (`--only ours` / `--only trl`, spawned by the parent), so that
neither sees the other's allocations. tokens/s = non-padding tokens (prompt + completion) of the
chosen and rejected sequences, summed over the timed steps, divided by the wall time from the end
of the last warm-up step to the end of the last step (data loading, forward, backward, clipping and
the optimiser step included; the warm-up steps excluded).

Peak memory:
- CPU: peak RSS growth of the process above its RSS once imports, tokenizer, data and the policy
  model exist (Linux VmHWM, reset via /proc/self/clear_refs; a 2 ms RSS sampler if that is not
  allowed). It counts everything created afterwards: optimiser state, the reference copy (TRL),
  the reference pre-computation (ours), TRL's dataset preparation, activations and gradients.
- CUDA: torch.cuda.max_memory_allocated over the same span (reset after the policy model is on the
  GPU), reported both as the total peak (policy weights included; used for the ratio) and as the
  growth above the allocation at the reset.

Usage:
    python benchmarks/train_step.py                      # CPU defaults, ~1 min on 2 cores
    python benchmarks/train_step.py --device cuda --hidden-size 1024 --layers 8 --vocab-size 32000 \
        --pairs 64 --batch-size 8 --seq-len 512 --steps 20
Variants, each in its own process: demoalign plain, with padding-free batches, with liger's
kernels, with both (liger only on CUDA with liger-kernel installed), TRL plain and TRL with its
own padding_free and use_liger_kernel options. MFU = 6 N tokens/s over the GPU's dense bf16 peak
(nan on the CPU). The LAST line printed is `ratio mfu=<ours, all levers> vs_trl=<ours all levers /
TRL's fastest variant, tokens/s> memory_vs_trl=<the same, peak memory>`.
TRL and datasets are needed for the TRL side (they are test-only dependencies of demoalign); without
them the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings

RESULT_TAG = "BENCH_RESULT "
# Each variant runs in its own process: (side, demoalign's levers or TRL's own options).
VARIANTS = {
    "ours": ("ours", {"padding_free": False, "liger": False}),
    "ours-padding-free": ("ours", {"padding_free": True, "liger": False}),
    "ours-liger": ("ours", {"padding_free": False, "liger": True}),
    "ours-all": ("ours", {"padding_free": True, "liger": True}),
    "ours-compile": ("ours", {"padding_free": False, "liger": False, "compile": True}),
    "trl": ("trl", {"padding_free": False, "liger": False}),
    "trl-levers": ("trl", {"padding_free": True, "liger": True}),
}
# Dense bf16 peak FLOP/s per GPU, for MFU (6 N FLOPs per token).
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}
TEMPLATE = "hh"  # prompt ends "Assistant:", response starts " ": identical tokens on both sides
WORDS = (
    "mix flour water salt yeast knead dough rise shape bake degrees minutes quick brown fox jumps "
    "over "
    "lazy dog journey thousand miles begins with one step please explain what neural network "
    "simple words "
    "student new topic question capital france paris sorry cannot help request anything else "
    "today sort "
    "digits add the a of and to in is it for on"
).split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="model vocabulary (the text tokenizer is a trained BPE of at most 1000 tokens; "
        "ids above it are never seen but the softmax spans them all)",
    )
    p.add_argument(
        "--pairs", type=int, default=32, help="distinct (prompt, chosen, rejected) pairs"
    )
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step")
    p.add_argument("--steps", type=int, default=12, help="timed optimiser steps")
    p.add_argument(
        "--warmup-steps", type=int, default=2, help="untimed optimiser steps before them"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="max tokens of prompt + response; responses are 25-100%% of the room left",
    )
    p.add_argument("--prompt-len", type=int, default=32, help="max prompt tokens (25-100%% of it)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 1:
        p.error(
            "--steps and --warmup-steps must be >= 1 (timing starts at the end of the last "
            "warm-up step)"
        )
    if args.prompt_len + 2 > args.seq_len:
        p.error("--seq-len must leave room for a response after --prompt-len")
    return args


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory growth above a baseline taken at `start()`."""

    def __init__(self, device: str):
        self.device = device
        self.method = ""
        self._sampler = None
        self._peak_kb = 0

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as fh:
            return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda max_memory_allocated"
            return
        import gc

        gc.collect()
        self.baseline = self._status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "RSS sampled every 2 ms"
            self._peak_kb = self._status_kb("VmRSS")
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._peak_kb = max(self._peak_kb, self._status_kb("VmRSS"))
                    time.sleep(0.002)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()

    def stop(self) -> dict:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"peak_bytes": peak, "growth_bytes": peak - self.baseline, "method": self.method}
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._peak_kb * 1024
        else:
            peak = self._status_kb("VmHWM") * 1024
        return {"peak_bytes": peak, "growth_bytes": peak - self.baseline, "method": self.method}


# ----------------------------------------------------------------------------- common setup


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build_model(tok, args):
    """demoalign.tiny's Llama, with the vocabulary set by --vocab-size."""
    from demoalign.tiny import TinyShape, tiny_llama

    shape = TinyShape(args.hidden_size, args.layers, args.heads, vocab_size=args.vocab_size)
    shape.max_positions = max(1024, args.seq_len)
    return tiny_llama(tok, shape, seed=args.seed)


def build_data(tok, args):
    """Random-word prompts and responses. Returns (texts for TRL, token ids for demoalign); the ids
    are what demoalign's Encoder makes of the texts, and the parity test shows that TRL's
    preparation gives the same ids for this template."""
    from demoalign.data import Example
    from demoalign.encoding import Encoder
    from demoalign.templates import render_prompt, response_text

    rng = random.Random(args.seed)
    encoder = Encoder(tok, TEMPLATE, max_length=args.seq_len, max_prompt_length=args.prompt_len)

    def words_up_to(n_tokens: int, render) -> str:
        words: list[str] = []
        while True:
            candidate = words + [rng.choice(WORDS)]
            if (
                len(tok(render(" ".join(candidate)), add_special_tokens=False)["input_ids"])
                > n_tokens
            ):
                return " ".join(words or candidate)
            words = candidate

    texts = {"prompt": [], "chosen": [], "rejected": []}
    ids = []
    scaffold = len(
        tok(render_prompt(Example("", ""), tok, TEMPLATE), add_special_tokens=False)["input_ids"]
    )
    for _ in range(args.pairs):
        p_target = rng.randint(max(1, args.prompt_len // 4), args.prompt_len) - scaffold
        prompt = words_up_to(max(1, p_target - 2), lambda s: s)
        example = Example(prompt=prompt, response="")
        prompt_ids = encoder.prompt_ids(example)
        room = args.seq_len - len(prompt_ids) - 1  # -1: the EOS
        responses = [
            words_up_to(
                rng.randint(max(1, room // 4), max(1, room)), lambda s: response_text(s, TEMPLATE)
            )
            for _ in range(2)
        ]
        chosen, rejected = (
            encoder.fit(prompt_ids, encoder.response_ids(r)).response_ids for r in responses
        )
        texts["prompt"].append(render_prompt(example, tok, TEMPLATE))
        texts["chosen"].append(response_text(responses[0], TEMPLATE))
        texts["rejected"].append(response_text(responses[1], TEMPLATE))
        ids.append((prompt_ids, chosen, rejected))
    # A cut would make our ids differ from what TRL makes of the (uncut) texts.
    assert encoder.counts.prompts_cut == 0 and encoder.counts.responses_cut == 0, encoder.counts
    return texts, ids


def batches(n_items: int, batch_size: int, n_steps: int):
    """Sequential batches, wrapping around like epochs of a sequential sampler."""
    order, out, epoch_pos = list(range(n_items)), [], 0
    for _ in range(n_steps):
        if epoch_pos >= n_items:
            epoch_pos = 0
        out.append(order[epoch_pos : epoch_pos + batch_size])
        epoch_pos += batch_size
    return out


def use_bf16(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_bf16_supported()


# ----------------------------------------------------------------------------- sides


def run_ours(args, tok, model, ids, memory: PeakMemory, levers: dict) -> dict:
    from demoalign.config import IRFTConfig
    from demoalign.kernels import apply_liger
    from demoalign.methods.irft import count_pairs, irft_loss_fn
    from demoalign.pairs import Pair, fill_reference_logps
    from demoalign.runio import MetricsLog
    from demoalign.trainer import Trainer, make_accelerator

    config = IRFTConfig(
        model="x",
        data="x",
        batch_size=args.batch_size,
        learning_rate=args.lr,
        cpu=args.device == "cpu",
        show_progress=False,
        beta=args.beta,
        loss_type="sigmoid",
        mixed_precision="bf16" if use_bf16(args.device) else "no",
        optimizer="adamw",
        weight_decay=0.0,
        max_grad_norm=1.0,
        padding_free="true" if levers["padding_free"] else "false",
        compile_training="true" if levers.get("compile") else "false",
    )
    if levers["liger"]:
        apply_liger(model)
    memory.start()
    accelerator = make_accelerator(config)
    trainer = Trainer(config, model, accelerator, MetricsLog(os.devnull, enabled=False))
    pairs = [Pair(p, c, r, index=i) for i, (p, c, r) in enumerate(ids)]
    sync(args.device)
    started = time.perf_counter()
    fill_reference_logps(
        trainer.unwrapped,
        pairs,
        tok.pad_token_id,
        args.batch_size,
        accelerator.autocast,
        padding_free=trainer.padding_free,
    )
    sync(args.device)
    ref_s = time.perf_counter() - started
    started = time.perf_counter()

    loss_fn = irft_loss_fn(args.beta, "sigmoid", 0.0, tok.pad_token_id)
    ends, tokens, losses = [], [], []
    for index_batch in batches(len(pairs), args.batch_size, args.warmup_steps + args.steps):
        batch = [pairs[i] for i in index_batch]
        record = trainer.step(batch, loss_fn, count_pairs(batch))
        sync(args.device)
        ends.append(time.perf_counter())
        tokens.append(
            sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch)
        )
        losses.append(record["loss"])
    mem = memory.stop()
    w = args.warmup_steps
    return {
        "side": "ours",
        "train_s": ends[-1] - ends[w - 1],
        "tokens": sum(tokens[w:]),
        "ref_precompute_s": ref_s,
        "warmup_s": ends[w - 1] - started,  # the compile, for ours-compile
        "first_loss": losses[0],
        "last_loss": losses[-1],
        **mem,
    }


def run_trl(args, tok, model, texts, memory: PeakMemory, levers: dict) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ends: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    device = args.device

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync(device)
            ends.append(time.perf_counter())

    class CountingDPOTrainer(DPOTrainer):
        # The same pairs in the same order as ours: a sequential sampler.
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")  # none when TRL packs the batch (padding_free)
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            loss = super().compute_loss(model, inputs, *a, **k)
            losses.append(float(loss.detach()))
            return loss

    memory.start()
    dataset = Dataset.from_dict(texts)
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = DPOConfig(
            output_dir=out_dir,
            use_cpu=device == "cpu",
            bf16=use_bf16(device),
            fp16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=True,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=args.warmup_steps + args.steps,
            beta=args.beta,
            loss_type=["sigmoid"],
            max_length=None,
            dataloader_num_workers=0,
            seed=args.seed,
            precompute_ref_log_probs=False,
            padding_free=levers["padding_free"],
            use_liger_kernel=levers["liger"] and liger_here(device),
        )
        trainer = CountingDPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[StepEnd()],
        )
        # The tokens TRL trains on are the ones ours trains on (checked by
        # tests/test_trl_parity.py).
        trainer.train()
    mem = memory.stop()
    w = args.warmup_steps
    assert len(ends) == args.warmup_steps + args.steps, (len(ends), args.warmup_steps + args.steps)
    return {
        "side": "trl",
        "train_s": ends[-1] - ends[w - 1],
        "tokens": sum(tokens[w:]),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        **mem,
    }


def child(args) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    if args.only.startswith("trl"):
        import datasets  # noqa: F401  (imports before the baseline, like ours)
        import trl  # noqa: F401
    import demoalign.methods  # noqa: F401
    import demoalign.trainer  # noqa: F401
    from demoalign.tiny import train_tokenizer

    tok = train_tokenizer(vocab_size=min(args.vocab_size, 1000))
    texts, ids = build_data(tok, args)
    model = build_model(tok, args)
    if args.device == "cuda":
        model.to("cuda")
    memory = PeakMemory(args.device)
    side, levers = VARIANTS[args.only]
    if side == "ours":
        result = run_ours(args, tok, model, ids, memory, levers)
    else:
        result = run_trl(args, tok, model, texts, memory, levers)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["variant"] = args.only
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def missing_trl() -> list[str]:
    return [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]


def spawn(variant: str, argv: list[str]) -> dict | None:
    """One variant in its own process; None (with the reason printed) where it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", variant]
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    print(f"{variant}: failed (exit status {proc.returncode}): {last}", flush=True)
    return None


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def liger_here(device: str) -> bool:
    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def variants_here(device: str) -> list[str]:
    """Every variant that can run here: liger only on CUDA with liger-kernel installed (TRL's
    own levers then include it; elsewhere its padding-free mode runs alone); the compiled forward
    only on CUDA by default (on 2 CPU cores its compile alone takes over a minute: `--only
    ours-compile` still runs it there)."""
    liger = liger_here(device)
    names = ["ours", "ours-padding-free"] + (["ours-liger", "ours-all"] if liger else [])
    return names + (["ours-compile"] if device == "cuda" else []) + ["trl", "trl-levers"]


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def describe_device(args) -> str:
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible to torch")
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} torch threads"


def run_variants(args, argv: list[str]) -> dict[str, dict]:
    results = {}
    for name in variants_here(args.device):
        result = spawn(name, argv)
        if result is None:
            continue
        result["tok_s"] = result["tokens"] / result["train_s"]
        result["ms_step"] = 1000 * result["train_s"] / args.steps
        peak = peak_flops(args.device)
        result["mfu"] = 6 * result["params"] * result["tok_s"] / peak if peak else float("nan")
        results[name] = result
    return results


def print_table(args, results: dict[str, dict]) -> str:
    """The table of every variant; returns the memory key the ratios use."""
    mem_key = "peak_bytes" if args.device == "cuda" else "growth_bytes"
    mem_name = "peak GPU MiB (total)" if args.device == "cuda" else "peak RSS growth MiB"
    print(f"{'variant':18}  {'tokens/s':>9}  {'ms/step':>8}  {'MFU':>6}  {mem_name:>20}  loss")
    for name, r in results.items():
        print(
            f"{name:18}  {r['tok_s']:9.0f}  {r['ms_step']:8.1f}  {r['mfu']:6.1%}  "
            f"{mib(r[mem_key]):>20}  {r['first_loss']:.4f} -> {r['last_loss']:.4f}"
        )
    if "ours-compile" in results:
        print(
            f"ours-compile: its {args.warmup_steps} untimed warm-up steps (the compile) took "
            f"{results['ours-compile']['warmup_s']:.1f} s, "
            f"ours' {results['ours']['warmup_s']:.1f} s"
        )
    counts = {r["tokens"] for r in results.values()}
    if len(counts) > 1:
        print(f"WARNING: the variants processed different token counts: {sorted(counts)}")
    return mem_key


def parent(args, argv: list[str]) -> None:
    missing = missing_trl()
    if missing:
        print(
            f"train_step.py: {', '.join(missing)} not importable in {sys.executable}; the TRL "
            "side needs `trl` and `datasets` (pip install 'trl>=1.0' datasets, or put their "
            "wheels on PYTHONPATH). Nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    print(
        f"device: {describe_device(args)}; model: Llama hidden {args.hidden_size}, {args.layers} "
        f"layers, vocab {args.vocab_size}; {args.pairs} pairs, batch {args.batch_size} pairs, "
        f"seq-len <= {args.seq_len}, {args.warmup_steps} warm-up + {args.steps} timed AdamW "
        f"steps, lr {args.lr}, {'bf16 autocast' if use_bf16(args.device) else 'fp32'}",
        flush=True,
    )
    results = run_variants(args, argv)
    if "ours" not in results or "trl" not in results:
        sys.exit("the plain demoalign or TRL variant failed: no ratio")
    mem_key = print_table(args, results)
    print(
        "ours: the reference log-probs once, before training (untimed); TRL: a reference model "
        "and its forward every step. Memory: each variant's own process, "
        + (
            "torch.cuda.max_memory_allocated from the moment the policy sits on the GPU."
            if args.device == "cuda"
            else "RSS growth above imports, tokenizer, data and the policy model."
        )
    )
    ours = results.get("ours-all") or results.get("ours-padding-free") or results["ours"]
    trl_best = max((r for n, r in results.items() if n.startswith("trl")), key=lambda r: r["tok_s"])
    print(
        f"plain paths: throughput={results['ours']['tok_s'] / results['trl']['tok_s']:.3f} "
        f"peak_memory={results['ours'][mem_key] / results['trl'][mem_key]:.3f}; compared below: "
        f"{ours['variant']} vs TRL's fastest, {trl_best['variant']}"
    )
    print(
        f"ratio mfu={ours['mfu']:.3f} vs_trl={ours['tok_s'] / trl_best['tok_s']:.3f} "
        f"memory_vs_trl={ours[mem_key] / trl_best[mem_key]:.3f}"
    )


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.only:
        child(args)
    else:
        parent(args, argv)


if __name__ == "__main__":
    main()
