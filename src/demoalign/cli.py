"""Command line: `demoalign sft|spin|irft|rft --config FILE key=value …`, `generate`, `tiny-model`,
`data inspect`. Every option comes from the config dataclasses (see `demoalign irft --help`).

The commands import their modules when they run, so that `demoalign --help` and a mistyped key
answer at once instead of after importing torch and transformers."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

from .config import DemoConfig, EvalConfig, GenerateConfig, load_config, option_docs
from .methods import METHODS


def _options_epilog(cls) -> str:
    lines = ["options (key=value on the command line, or keys of the --config YAML):"]
    for key, default, help_text in option_docs(cls):
        lines.append(f"  {key} (default {default})")
        lines.extend(
            textwrap.wrap(help_text, 88, initial_indent="      ", subsequent_indent="      ")
        )
    return "\n".join(lines)


def _add_config_command(sub, name: str, cls, help_text: str):
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=_options_epilog(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of config keys; key=value arguments override it")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demoalign", description="Reward learning from demonstrations for LLM alignment."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for method in METHODS.values():
        _add_config_command(sub, method.name, method.config_class, method.help)
    _add_config_command(sub, "generate", GenerateConfig, "Sample one response per prompt.")
    _add_config_command(
        sub,
        "eval",
        EvalConfig,
        "Compare models: preference-pair, task and reward-model metrics with bootstrap intervals.",
    )
    _add_config_command(
        sub, "demo", DemoConfig, "The built-in task: SFT, SPIN, IRFT and RFT compared over seeds."
    )
    tiny = sub.add_parser(
        "tiny-model", help="Write a tiny random model + tokenizer for trials and tests."
    )
    tiny.add_argument("out")
    tiny.add_argument(
        "--tokenizer",
        default="trained",
        choices=["trained", "gpt2", "neox"],
        help="trained: a byte-level BPE trained here (fast); gpt2/neox: the real tokenizer "
        "files under $DEMOALIGN_DATA/tokenizers",
    )
    tiny.add_argument(
        "--vocab-size", type=int, default=512, help="vocabulary of the trained tokenizer"
    )
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    convert = sub.add_parser(
        "convert", help="Write a .gguf model as a Hugging Face folder (weights dequantised)."
    )
    convert.add_argument("src", help="a .gguf file, or a folder holding exactly one")
    convert.add_argument("out_dir", help="the Hugging Face folder to write (must not exist)")
    data = sub.add_parser("data", help="Data utilities.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser(
        "inspect",
        help="Show the recognised format and counts of a data file, dataset folder or hub id.",
    )
    inspect.add_argument(
        "file",
        help="what `data=` takes: a file, a dataset folder or a hub id (ID[@CONFIG][:SPLIT])",
    )
    inspect.add_argument("--columns", default="", help="prompt:COLUMN,response:COLUMN")
    inspect.add_argument("--data-split", default="", help="as data_split= of training")
    inspect.add_argument("--data-config", default="", help="as data_config= of training")
    inspect.add_argument("--data-revision", default="", help="as data_revision= of training")
    inspect.add_argument(
        "options",
        nargs="*",
        metavar="key=value",
        help=f"the same as training's keys: {', '.join(INSPECT_KEYS)}=...",
    )
    return parser


INSPECT_KEYS = ("columns", "data_split", "data_config", "data_revision")


def _inspect_options(args) -> dict:
    """`data inspect`'s options from its --flags and from key=value, spelt as training spells
    them (what a user who just trained types)."""
    found = {key: getattr(args, key) for key in INSPECT_KEYS}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or key not in INSPECT_KEYS:
            raise ValueError(
                f"data inspect takes FILE and {', '.join(k + '=' for k in INSPECT_KEYS)}; "
                f"not {item!r}"
            )
        found[key] = value
    return found


def run_generate(config: GenerateConfig) -> None:
    import torch

    from .data import load_examples, load_prompts, parse_columns
    from .encoding import Encoder
    from .generation import GenerationEngine, generate_responses
    from .models import generation_dtype, load_model_and_tokenizer
    from .runio import atomic_write_jsonl
    from .templates import resolve_template

    limit = config.max_examples or None
    if config.columns:
        examples, _ = load_examples(config.data, parse_columns(config.columns), limit)
    else:  # a file of prompts alone is enough; responses, where present, are ignored
        examples = load_prompts(config.data, limit)
    gpu = not config.cpu and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    model, tokenizer = load_model_and_tokenizer(
        config.model, generation_dtype(config.dtype, device)
    )
    model = model.to(device)
    template = resolve_template(tokenizer, config.template)
    encoder = Encoder(
        tokenizer,
        template,
        config.max_prompt_length + config.max_new_tokens,
        config.max_prompt_length,
    )
    with GenerationEngine() as engine:
        records = generate_responses(
            engine, model, tokenizer, encoder, examples, config, show_progress=True
        )
    atomic_write_jsonl(config.output, records)
    print(f"wrote {len(records)} generations to {config.output}")


def _print_run_folder(out: Path, config) -> None:
    print(f"done: run folder {out}")
    print(f"  model and tokenizer: {out / 'final'}")
    print(f"  metrics log:         {out / 'metrics.jsonl'}")
    cut = _truncation_note(out, config)
    if cut:
        print(f"  cut to fit:          {cut}")
    if (out / "stages").exists():
        print(f"  negatives per stage: {out / 'stages'}/<k>/negatives.jsonl")
    if (out / "iterations").exists():
        print(
            f"  per outer iteration: {out / 'iterations'}/<k>/negatives.jsonl, reward_model/, "
            "policy/"
        )


CUT_COUNTS = ("prompts", "responses", "demonstrations", "negatives")


def _truncation_note(out: Path, config) -> str:
    """How many sequences the length limits cut (from the run_end record), so that limits too
    small for the data are seen at once, not only in metrics.jsonl; empty when none was cut."""
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    end = next((json.loads(line) for line in reversed(lines) if '"run_end"' in line), {})
    counts = {name: end.get(f"{name}_truncated") for name in CUT_COUNTS}
    cut = [f"{n} {name}" for name, n in counts.items() if n]
    if not cut:
        return ""
    total = end.get("sequences") or end.get("pairs")
    of_total = f" of {total}" if total else ""
    return (
        f"{', '.join(cut)}{of_total} (max_prompt_length={config.max_prompt_length} cuts a "
        f"prompt's beginning, max_length={config.max_length} a response's end)"
    )


def _print_eval(results: dict, config: EvalConfig) -> None:
    for entry in results["models"]:
        cells = ", ".join(
            f"{k} {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
            for k, m in entry["metrics"].items()
        )
        print(f"{entry['name']}: {cells}")
    print(f"wrote {config.output_dir}/results.json and {config.output_dir}/report.md")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_config = None  # a training command's config, for the message after Ctrl-C
    try:
        if args.command in METHODS:
            from .run import train

            config_class = METHODS[args.command].config_class
            run_config = load_config(config_class, args.config, args.overrides)
            _print_run_folder(train(run_config), run_config)
        elif args.command == "demo":
            from .eval.demo import run_demo

            run_demo(load_config(DemoConfig, args.config, args.overrides))
        elif args.command == "eval":
            from .eval import evaluate

            config = load_config(EvalConfig, args.config, args.overrides)
            _print_eval(evaluate(config), config)
        elif args.command == "generate":
            run_generate(load_config(GenerateConfig, args.config, args.overrides))
        elif args.command == "tiny-model":
            from .tiny import make_tiny_model

            out = make_tiny_model(
                args.out,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                hidden_size=args.hidden_size,
                num_layers=args.layers,
                seed=args.seed,
            )
            print(f"tiny model written to {out}")
        elif args.command == "convert":
            from .gguf import convert_gguf

            if Path(args.out_dir).exists():
                raise FileExistsError(f"{args.out_dir} exists; choose a new folder")
            print(f"wrote {convert_gguf(args.src, args.out_dir)}")
        elif args.command == "data":
            from .data import inspect_data, parse_columns
            from .data.hub import data_ref

            opts = _inspect_options(args)
            split, config, revision = opts["data_split"], opts["data_config"], opts["data_revision"]
            source = data_ref(args.file, split, config, revision)
            print(inspect_data(source, parse_columns(opts["columns"] or None)))
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(run_config), file=sys.stderr)
        return 130  # the shell's code for a run ended by SIGINT
    return 0


def _interrupted_message(config) -> str:
    """What Ctrl-C leaves: for a training run, the checkpoint that resume=true continues from."""
    if config is None:
        return "\ninterrupted"
    from .run import unfinished_checkpoint

    checkpoint = unfinished_checkpoint(config.output_dir)
    if checkpoint is None:
        restart = "resume=true" if config.keep_checkpoints else "overwrite=true"
        return (
            f"\ninterrupted before {config.output_dir} held a checkpoint of this run; rerun the "
            f"same command with {restart} to start it again"
        )
    return (
        f"\ninterrupted: {config.output_dir} keeps checkpoint {checkpoint.name}; rerun the same "
        "command with resume=true to continue from it"
    )


def entry() -> None:
    """The `demoalign` command: `main`'s exit status. After Ctrl-C (status 130, its message
    printed) the process ends by SIGINT itself, as an interrupted program does, so that a shell
    loop over demoalign commands stops instead of going on to the next one."""
    code = main()
    if code == 130:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    entry()
