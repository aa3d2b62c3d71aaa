"""One IRFT stage, three generation engines, one run: where a stage's time goes.

A stage is: generate one negative per prompt, reference log-probs of (demonstration, negative),
one epoch of pairwise training. The stage goes through the package's own code (`make_negatives`,
`Trainer.fit`); the generation and reference phases are timed by wrapping the functions
`make_negatives` calls. Engines:

- `hf-b16-fp32`: the old default: `hf` backend, batch 16, fp32 master weights under bf16 autocast.
  On a GPU it is measured on `--old-prompts` prompts (it is slow) and its time is scaled to all.
- `hf-bf16-b256`: `hf` backend on a bf16 copy of the weights, batch 256 (fp32, no copy, on CPU).
- `hf-cb`: transformers' continuous batching (`generate_batch`, paged KV cache, finished rows
  refilled) on the same copy, for comparison only (on CPU on 8 prompts, time scaled).
- `static`: the new engine as a stage runs it (`generation_backend=static`,
  `generation_batch_size=auto`). Stage 1 pays the compile; stage 2 (after training changed the
  weights) is the warm figure reported. Stage 2 takes its reference log-probs at decode time and
  compares them with a forward pass over the same negatives.

Default shape on a GPU: the pythia-1.4b shape as a Llama (hidden 2048, 24 layers, 16 heads, vocab
50304, untied embeddings), random weights, 256 prompts, 256 sampled new tokens. `--model PATH`
takes any causal LM instead. `--device cpu` uses a tiny model and small sizes (under 2 minutes on
2 cores). The training levers (`--padding-free`, `--micro-batch-size`) are the package's options,
`auto` by default as in a run; their resolved values are printed before the first stage. The
last line is `ratio generation=<static / hf-bf16-b256> stage_share=<static's
generation share of the stage>`.

    python benchmarks/stage.py --device cpu
    python benchmarks/stage.py --device cuda --tokenizer /path/to/20B_tokenizer.json
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

WORDS = (
    "mix flour water salt yeast knead dough rise shape bake degrees minutes quick brown fox jumps "
    "over lazy dog journey thousand miles begins with one step please explain what neural network "
    "simple words student new topic question capital france paris sorry cannot help request "
    "anything else today sort digits add the a of and to in is it for on"
).split()
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--model",
        default="",
        help="a causal LM folder (default: a random model of the shape below)",
    )
    p.add_argument(
        "--tokenizer",
        default=os.environ.get("DEMOALIGN_TOKENIZER", ""),
        help="tokenizer.json file or tokenizer folder (default $DEMOALIGN_TOKENIZER; on CPU a "
        "small BPE trained in-process)",
    )
    p.add_argument(
        "--prompts", type=int, default=None, help="prompts in the stage (cuda 256, cpu 48)"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens (cuda 256, cpu 24)")
    p.add_argument(
        "--prompt-tokens", type=int, default=None, help="longest prompt (cuda 128, cpu 48)"
    )
    p.add_argument(
        "--old-prompts",
        type=int,
        default=None,
        help="prompts the old default is measured on, then scaled (cuda 32, cpu all)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="training pairs per step")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--padding-free",
        default="auto",
        choices=("auto", "true", "false"),
        help="the training lever padding_free (auto: the package's choice for this model)",
    )
    p.add_argument(
        "--micro-batch-size",
        default="auto",
        help="the training lever micro_batch_size: auto, fixed or a token budget",
    )
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = dict(
        prompts=256 if gpu else 48,
        new_tokens=256 if gpu else 24,
        prompt_tokens=128 if gpu else 48,
        hidden_size=2048 if gpu else 64,
        layers=24 if gpu else 2,
        heads=16 if gpu else 4,
        intermediate_size=5504 if gpu else 128,
        vocab_size=50304 if gpu else 512,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.old_prompts is None:
        args.old_prompts = 32 if gpu else args.prompts
    args.old_prompts = min(args.old_prompts, args.prompts)
    return args


def load_tokenizer(args):
    from demoalign.tiny import tokenizer_from_file, train_tokenizer

    if args.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
    elif args.tokenizer:
        path = Path(args.tokenizer)
        if path.is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
        else:
            tok = tokenizer_from_file(path)
    elif args.device == "cpu":
        tok = train_tokenizer(vocab_size=args.vocab_size)
    else:
        sys.exit(
            "--tokenizer (or $DEMOALIGN_TOKENIZER) is needed on a GPU: the GPT-NeoX tokenizer.json"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def build_model(tok, args, device):
    import torch
    from transformers import AutoModelForCausalLM

    from demoalign.tiny import TinyShape, tiny_llama

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    shape = TinyShape(
        args.hidden_size,
        args.layers,
        args.heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        max_positions=max(1024, args.prompt_tokens + 2 * args.new_tokens),
        tie_word_embeddings=False,
    )
    # random init on the GPU: seconds instead of a minute on CPU
    return tiny_llama(tok, shape, seed=args.seed, device=device)


def build_examples(tok, args):
    from demoalign.data import Example

    rng = random.Random(args.seed)

    def words(n_tokens: int) -> str:
        text = ""
        while len(tok(text)["input_ids"]) < n_tokens:
            text += " ".join(rng.choice(WORDS) for _ in range(8)) + " "
        return text.strip()

    # Prompt lengths spread over [prompt_tokens / 4, prompt_tokens] (the template adds a few).
    return [
        Example(
            words(rng.randint(args.prompt_tokens // 4, args.prompt_tokens - 16)),
            words(rng.randint(args.new_tokens // 2, args.new_tokens)),
        )
        for _ in range(args.prompts)
    ]


class Clock:
    """Wall time and peak memory of one phase (CUDA: max allocated; CPU: not measured)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peak = None
        self.seconds = time.perf_counter() - self.start
        return False


def gib(value) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


def continuous_batching_row(model, tok, prompts, args, device, clock_type) -> dict | None:
    """transformers' `generate_batch` (continuous batching over a paged KV cache) on the same
    prompts, sampled, for comparison: the package does not use it (it takes no per-batch seed,
    so its samples would not be reproducible run to run). On CPU only a few prompts (it is slow
    there); None where this transformers lacks it or it fails, with the reason printed."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        log("[hf-cb] this transformers has no generate_batch: skipped")
        return None
    subset = prompts if device.type == "cuda" else prompts[:8]
    config = GenerationConfig(
        max_new_tokens=args.new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    log(f"[hf-cb] generating {len(subset)} prompts ...")
    try:
        with clock_type(device) as clock:
            out = model.generate_batch(subset, generation_config=config, progress_bar=False)
    except Exception as error:  # a comparison row: its failure must not end the benchmark
        log(f"[hf-cb] failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return None
    made = sum(len(o.generated_tokens) for o in out.values())
    row = dict(
        rate=made / clock.seconds,
        seconds=clock.seconds * len(prompts) / len(subset),
        peak=clock.peak,
        note=f"generate_batch, {len(subset)} prompts"
        + (", time scaled" if subset is not prompts else ""),
    )
    log(f"[hf-cb] {row['rate']:.0f} new tok/s ({clock.seconds:.1f} s)")
    return row


def new_tokens(generated: dict) -> int:
    return sum(len(v) for v in generated.values())


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    import torch._dynamo.utils  # the compile counters, read after each stage

    from demoalign.config import IRFTConfig
    from demoalign.encoding import Encoder
    from demoalign.generation import (
        QUIET,
        GenerationEngine,
        SamplingOptions,
        generate_ids,
        half_copy,
    )
    from demoalign.methods import irft, negatives
    from demoalign.runio import MetricsLog
    from demoalign.trainer import FitPlan, Trainer, make_accelerator

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device")
    device = torch.device(args.device)
    tok = load_tokenizer(args)
    model = build_model(tok, args, device)
    n_params = sum(p.numel() for p in model.parameters())
    examples = build_examples(tok, args)
    max_length = args.prompt_tokens + args.new_tokens
    encoder = Encoder(tok, "instruction", max_length, args.prompt_tokens)
    prompts = [encoder.prompt_ids(e) for e in examples]
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    log(
        f"device {name}; model {n_params / 1e6:.1f}M parameters, vocab {model.config.vocab_size}; "
        f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{args.new_tokens} new tokens, sampled; setup {time.perf_counter() - started:.0f} s"
    )
    common = dict(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, seed=args.seed)
    engine = GenerationEngine()  # one for the whole benchmark, as a run has
    rows = {}

    # ---- the old default: hf, batch 16, fp32 weights under autocast
    subset = random.Random(args.seed + 1).sample(range(len(prompts)), args.old_prompts)
    log(f"[hf-b16-fp32] generating {len(subset)} prompts ...")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with Clock(device) as clock, autocast:
        options = SamplingOptions(batch_size=16, backend="hf", **common)
        out = generate_ids(engine, model, tok, [prompts[i] for i in subset], options, QUIET)
    rows["hf-b16-fp32"] = dict(
        rate=new_tokens(out) / clock.seconds,
        seconds=clock.seconds * len(prompts) / len(subset),
        peak=clock.peak,
        note=f"measured on {len(subset)} prompts, time scaled",
    )
    log(f"[hf-b16-fp32] {rows['hf-b16-fp32']['rate']:.0f} new tok/s ({clock.seconds:.1f} s)")

    # ---- hf on half-precision weights, batch 256
    log("[hf-bf16-b256] generating ...")
    half = half_copy(model, torch.bfloat16) if device.type == "cuda" else model
    with Clock(device) as clock:
        options = SamplingOptions(batch_size=256, backend="hf", **common)
        out = generate_ids(engine, half, tok, prompts, options, QUIET)
    rows["hf-bf16-b256"] = dict(
        rate=new_tokens(out) / clock.seconds,
        seconds=clock.seconds,
        peak=clock.peak,
        note="bf16 copy" if half is not model else "fp32 (CPU)",
    )
    log(f"[hf-bf16-b256] {rows['hf-bf16-b256']['rate']:.0f} new tok/s ({clock.seconds:.1f} s)")

    del half, out
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- the new engine, as a stage runs it: two stages on the package's own code
    config = IRFTConfig(
        model="-",
        data="-",
        max_length=max_length,
        max_prompt_length=args.prompt_tokens,
        max_new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        learning_rate=1e-6,
        stages=1,
        generation_backend="static",
        generation_batch_size="auto",
        cpu=device.type == "cpu",
        seed=args.seed,
        show_progress=False,
        padding_free=args.padding_free,
        micro_batch_size=args.micro_batch_size,
    )
    config.validate()
    accelerator = make_accelerator(config)
    trainer = Trainer(config, model, accelerator, MetricsLog(os.devnull, enabled=False))
    levers = ", ".join(f"{k}={v}" for k, v in asdict(trainer.levers).items())
    log(f"training levers (as resolved for this model and device): {levers}")
    trainer.start_schedule(4 * len(prompts))
    loss_fn = irft.irft_loss_fn(config.beta, config.loss_type, 0.0, tok.pad_token_id)
    phases = {}
    real_generate, real_reference = negatives.generate_ids, negatives.fill_reference_logps

    def timed(key, fn):
        def wrapper(*a, **k):
            with Clock(device) as c:
                result = fn(*a, **k)
            phases[key] = phases.get(key, 0.0) + c.seconds
            if c.peak is not None:
                phases[key + "_peak"] = max(phases.get(key + "_peak", 0.0), c.peak)
            if key == "generation":
                got = result[0] if isinstance(result, tuple) else result
                phases["new_tokens"] = new_tokens(got)
            return result

        return wrapper

    negatives.generate_ids = timed("generation", real_generate)
    negatives.fill_reference_logps = timed("reference", real_reference)
    stages = []
    try:
        for stage in (1, 2):
            phases.clear()
            config.reference_logps = "decode" if stage == 2 else "forward"
            log(f"[static] stage {stage}: negatives{' (first call: compile)' * (stage == 1)} ...")
            pairs = negatives.make_negatives(
                config, trainer, encoder, examples, stage, engine=engine
            )
            parked = trainer.parking_record()
            phases["parking_s"] = parked.get("optimizer_parking_s", 0.0)
            log(
                f"[static] stage {stage}: generation {phases['generation']:.1f} s "
                f"({phases['new_tokens'] / phases['generation']:.0f} new tok/s), "
                f"reference {phases['reference']:.1f} s, optimiser state parked "
                f"{gib(parked.get('optimizer_state_parked_bytes', 0) / 2**30)} "
                f"in {phases['parking_s']:.2f} s (there and back)"
            )
            if stage == 2:
                decoded = [p.ref_rejected for p in pairs]
                check = [copy.copy(p) for p in pairs]
                with Clock(device) as ref_clock:
                    real_reference(
                        trainer.unwrapped, check, tok.pad_token_id, 16, accelerator.autocast
                    )
                phases["reference_forward"] = ref_clock.seconds
                diffs = [abs(a - p.ref_rejected) for a, p in zip(decoded, check)]
                phases["decode_diff"] = (
                    sum(diffs) / len(diffs),
                    max(diffs),
                    sum(len(p.rejected_ids) for p in pairs) / len(pairs),
                )
            tokens = sum(
                2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
            )
            log(f"[static] stage {stage}: training {len(pairs)} pairs ...")
            with Clock(device) as clock:
                plan = FitPlan(
                    loss_fn,
                    irft.count_pairs,
                    1,
                    seed_parts=(args.seed, stage),
                    context={"method": "irft", "stage": stage},
                )
                trainer.fit(pairs, plan)
            phases.update(train_s=clock.seconds, train_tokens=tokens, train_peak=clock.peak)
            log(
                f"[static] stage {stage}: training {clock.seconds:.1f} s "
                f"({tokens / clock.seconds:.0f} tok/s)"
            )
            phases["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            stages.append(dict(phases))
    finally:
        negatives.generate_ids, negatives.fill_reference_logps = real_generate, real_reference

    first, warm = stages
    log(
        f"compiled graphs after stage 1: {first['graphs']}, after stage 2: {warm['graphs']} "
        f"({'no recompile' if first['graphs'] == warm['graphs'] else 'RECOMPILED'})"
    )
    static = engine.static_engine(trainer.unwrapped)
    state = ("compiled" if static.compile else "uncompiled") + (
        ", bf16 copy" if static.half else ", fp32"
    )
    rows["static"] = dict(
        rate=warm["new_tokens"] / warm["generation"],
        seconds=warm["generation"] + warm["parking_s"],  # the parking is generation's overhead
        peak=warm.get("generation_peak"),
        note=f"{state}, batch {static.auto_size}; stage 2 (warm), incl. "
        f"{warm['parking_s']:.2f} s parking the optimiser state; stage 1 generation "
        f"{first['generation']:.1f} s incl. compile",
    )
    train_s = warm["train_s"]
    train_rate = warm["train_tokens"] / train_s
    reference_s = first["reference"]  # a forward over demonstrations and negatives
    peak_flops = (
        next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if device.type == "cuda"
        else None
    )
    mfu = f"{6 * n_params * train_rate / peak_flops:.1%}" if peak_flops else "n/a"
    log("")
    log(
        f"training (stage 2): {train_rate:.0f} tok/s, MFU {mfu} (6N FLOPs/token), {train_s:.1f} s, "
        f"peak {gib(warm['train_peak'])}; reference forward {reference_s:.1f} s, "
        f"peak {gib(first.get('reference_peak'))}"
    )
    mean, worst, tokens = warm["decode_diff"]
    log(
        f"reference_logps=decode vs forward (negatives of {tokens:.0f} tokens on average): "
        f"mean |diff| {mean:.4f} nats, max {worst:.4f} nats per sequence; decode stage reference "
        f"{warm['reference']:.1f} s vs forward {reference_s:.1f} s"
    )

    def engine_line(key: str, row: dict) -> float:
        """Logs one engine's figures; returns its generation share of the stage."""
        share = row["seconds"] / (row["seconds"] + reference_s + train_s)
        log(
            f"engine {key}: generation {row['rate']:.0f} new tok/s, {row['seconds']:.1f} s for "
            f"{len(prompts)} "
            f"prompts; training {train_rate:.0f} tok/s, MFU {mfu}; generation share of the stage "
            f"{share:.1%}; peak memory generation {gib(row['peak'])}, training "
            f"{gib(warm['train_peak'])} ({row['note']})"
        )
        return share

    shares = {key: engine_line(key, row) for key, row in rows.items()}
    ratio = rows["static"]["rate"] / rows["hf-bf16-b256"]["rate"]
    ratio_line = f"ratio generation={ratio:.3f} stage_share={shares['static']:.3f}"
    print(ratio_line, flush=True)

    # ---- last, since it has not run on a GPU here yet and might not return: everything above
    # is printed by then. transformers' continuous batching (paged attention, finished rows
    # refilled) on a bf16 copy of the trained weights.
    trainer.reset_optimizer()  # as before the other rows: no optimiser state in memory
    engine.close()  # nor the static engine's copy and compiled step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = half_copy(trainer.unwrapped, torch.bfloat16) if device.type == "cuda" else model
    cb = continuous_batching_row(half, tok, prompts, args, device, Clock)
    if cb is not None:
        engine_line("hf-cb", cb)
    log(f"total wall time {time.perf_counter() - started:.0f} s")
    print(ratio_line, flush=True)  # again, so that it is the last line


if __name__ == "__main__":
    main()
