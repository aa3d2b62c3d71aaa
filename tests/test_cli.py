import json
from dataclasses import fields

import pytest

from conftest import DOLLY, SHARED_DATA
from demoalign.cli import main
from demoalign.config import CONFIGS, GenerateConfig


@pytest.mark.parametrize("command", ["sft", "spin", "irft", "generate"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    cls = GenerateConfig if command == "generate" else CONFIGS[command]
    for f in fields(cls):
        assert f"  {f.name} (default" in text, f.name
        assert f.metadata.get("help"), f"{f.name} has no documentation"


def test_options_reference_is_current_and_documents_every_option():
    from pathlib import Path

    from demoalign.config import DemoConfig
    from demoalign.docs import END, OPTIONS_PAGE, START, reference_markdown

    root = Path(__file__).resolve().parents[1]
    page = (root / OPTIONS_PAGE).read_text()
    assert f"{START}\n{reference_markdown()}\n{END}" in page, (
        f"{OPTIONS_PAGE} reference is stale: run `make docs`"
    )
    for cls in (*CONFIGS.values(), GenerateConfig, DemoConfig):
        for f in fields(cls):
            assert f"`{f.name}`" in page, f"{OPTIONS_PAGE} misses {f.name}"
    assert OPTIONS_PAGE in (root / "README.md").read_text(), f"README does not link {OPTIONS_PAGE}"


def test_cli_tiny_model_train_generate_and_inspect(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "tiny"
    assert main(["tiny-model", str(model_dir), "--vocab-size", "300", "--hidden-size", "32"]) == 0
    AutoModelForCausalLM.from_pretrained(model_dir)
    out = tmp_path / "run"
    args = [
        f"model={model_dir}",
        f"data={DOLLY}",
        "max_examples=8",
        f"output_dir={out}",
        "max_length=64",
        "max_prompt_length=32",
        "max_new_tokens=6",
        "batch_size=4",
        "stages=2",
        "show_progress=false",
    ]
    assert main(["irft", *args]) == 0
    assert (out / "final" / "model.safetensors").exists()
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    cut = f"{end['prompts_truncated']} prompts, {end['demonstrations_truncated']} demonstrations"
    assert end["prompts_truncated"] > 0, "the limits above must cut some of these prompts"
    assert f"cut to fit:          {cut}" in capsys.readouterr().out  # not only in metrics.jsonl
    assert main(["irft", *args]) == 2, "a non-empty run folder must be refused"
    assert "overwrite" in capsys.readouterr().err
    gen_file = tmp_path / "gen.jsonl"
    assert (
        main(
            [
                "generate",
                f"model={out / 'final'}",
                f"data={DOLLY}",
                "max_examples=3",
                f"output={gen_file}",
                "max_new_tokens=5",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in gen_file.read_text().splitlines()]
    assert len(rows) == 3 and all(
        {"prompt", "response", "tokens", "finished"} <= set(r) for r in rows
    )
    assert (
        main(["data", "inspect", str(SHARED_DATA / "hh_rlhf" / "helpful-online" / "test.jsonl.gz")])
        == 0
    )
    text = capsys.readouterr().out
    assert "hh" in text and "1137" in text
    assert main(["irft", *args, "overwrite=true", "stagez=2"]) == 2
    assert "did you mean `stages`" in capsys.readouterr().err


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_every_bad_input_is_one_error_line_exit_2_and_touches_nothing(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    base = [f"data={DOLLY}", "max_examples=4", "show_progress=false", "cpu=true"]
    out = tmp_path / "run"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [
        (["sft", f"model={DOLLY}", f"output_dir={out}", *base], "is a file"),
        (["sft", f"model={tmp_path / 'missing'}", f"output_dir={out}", *base], "no such model"),
        (["sft", "--config", str(bad_yaml), f"output_dir={out}", *base], "invalid YAML"),
        (["sft", f"model={tiny_model_dir}", f"output_dir={a_file}", *base], "is a file"),
        (["irft", f"model={tiny_model_dir}", f"output_dir={out}", "beta=nan", *base], "beta"),
        (["sft", f"model={tiny_model_dir}", f"output_dir={out}", "epochs=0", *base], "epochs"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in _one_error_line(capsys)
    assert not out.exists() and a_file.read_text() == "keep me"

    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("mine: 1\n")
    (work / "train.py").write_text("print('mine')\n")
    monkeypatch.chdir(work)
    argv = ["sft", f"model={tiny_model_dir}", "output_dir=.", "overwrite=true", *base]
    assert main(argv) == 2
    assert "not a demoalign run folder" in _one_error_line(capsys)
    assert sorted(p.name for p in work.iterdir()) == ["config.yaml", "train.py"]


def test_generate_reads_a_file_of_prompts_alone(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "Name a fruit")))
    output = tmp_path / "gen.jsonl"
    assert (
        main(
            [
                "generate",
                f"model={tiny_model_dir}",
                f"data={prompts}",
                f"output={output}",
                "max_new_tokens=4",
                "cpu=true",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hi", "Name a fruit"]


def test_generate_loads_the_model_in_the_precision_asked(tiny_model_dir, tmp_path, monkeypatch):
    """dtype=bfloat16 generates from bf16 weights (one copy, where float32 on a GPU holds a second,
    bf16 one for the static engine); auto is bf16 on a GPU that has it, float32 elsewhere."""
    import torch

    from demoalign import generation
    from demoalign.models import generation_dtype

    seen = []
    real = generation.generate_responses

    def recording(engine, model, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters()})
        return real(engine, model, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_responses", recording)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "sort 3 1 2")))
    common = [f"model={tiny_model_dir}", f"data={prompts}", "max_new_tokens=6", "cpu=true"]
    for dtype in ("bfloat16", "auto"):
        output = tmp_path / f"{dtype}.jsonl"
        assert main(["generate", *common, f"output={output}", f"dtype={dtype}"]) == 0
        assert len(output.read_text().splitlines()) == 2
    assert seen == [{torch.bfloat16}, {torch.float32}]  # auto on the CPU: float32
    assert main(["generate", *common, f"output={tmp_path / 'x.jsonl'}", "dtype=half"]) == 2

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert generation_dtype("float16", cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert generation_dtype("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert generation_dtype("auto", gpu) == torch.float32


def test_generate_never_replaces_its_data_and_asks_before_replacing_a_file(
    tiny_model_dir, tmp_path, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    base = [
        "generate",
        f"model={tiny_model_dir}",
        f"data={prompts}",
        "max_new_tokens=2",
        "cpu=true",
    ]
    assert main([*base, f"output={prompts}", "overwrite=true"]) == 2
    assert "data file itself" in capsys.readouterr().err
    assert prompts.read_text() == json.dumps({"prompt": "Hi"}) + "\n"
    existing = tmp_path / "mine.jsonl"
    existing.write_text("keep\n")
    assert main([*base, f"output={existing}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err and existing.read_text() == "keep\n"
    assert main([*base, f"output={existing}", "overwrite=true"]) == 0
    assert json.loads(existing.read_text().splitlines()[0])["prompt"] == "Hi"


def test_data_inspect_takes_the_keys_as_training_spells_them(capsys):
    gsm8k = str(SHARED_DATA / "gsm8k" / "test.jsonl")
    columns = "prompt:question,response:answer"
    for argv in (["columns=" + columns], ["--columns", columns]):
        assert main(["data", "inspect", gsm8k, *argv]) == 0
        assert "record format:    columns" in capsys.readouterr().out
    assert main(["data", "inspect", gsm8k, "split=test"]) == 2
    assert "takes FILE and columns=, data_split=" in _one_error_line(capsys)


def test_after_ctrl_c_the_command_ends_by_sigint_so_a_shell_loop_stops():
    import signal
    import subprocess
    import sys

    script = "import demoalign.cli as c; c.main = lambda: {code}; c.entry()"
    interrupted = subprocess.run([sys.executable, "-c", script.format(code=130)])
    assert interrupted.returncode == -signal.SIGINT
    assert subprocess.run([sys.executable, "-c", script.format(code=2)]).returncode == 2
