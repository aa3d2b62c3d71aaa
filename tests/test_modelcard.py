"""Model cards: final/README.md (and RFT's reward models) in the Hugging Face format, written
with the folder, their figures those of metrics.jsonl; `demoalign eval` adds its figures."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import read_metrics, small_rft_values, small_run_config
from demoalign import IRFTConfig, RFTConfig, evaluate, train
from demoalign import runio as runio_module
from demoalign.config import build_config
from demoalign.modelcard import (
    EVAL_MARKER,
    is_demoalign_card,
    library_version,
    split_card,
    with_eval_figures,
)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("\n---\n", 1)[0][4:])
    assert isinstance(meta, dict)
    return meta


def _table_after(card: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first Markdown table after `heading`: first cell -> the other cells."""
    lines = card[card.index(heading) :].splitlines()[1:]
    rows, started = {}, False
    for line in lines:
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif started:
            break
    rows.pop("metric", None)
    rows.pop("---", None)
    return rows


def _as_written(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _assert_figures(card: str, heading: str, record: dict) -> None:
    rows = _table_after(card, heading)
    expected = {k: _as_written(v) for k, v in record.items() if k != "event"}
    assert {k: v[0] for k, v in rows.items()} == expected


@pytest.fixture(scope="module")
def irft_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "run"
    return train(small_run_config(IRFTConfig, tiny_model_dir, out, beta=0.2))


def test_final_has_a_model_card_with_the_runs_figures(irft_run, tiny_model_dir):
    card = (irft_run / "final" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["library_name"] == "transformers"
    assert "demoalign" in meta["tags"] and "irft" in meta["tags"]

    records = read_metrics(irft_run)
    steps = [r for r in records if "loss" in r and "event" not in r]
    run_end = [r for r in records if r.get("event") == "run_end"][-1]
    _assert_figures(card, "### last optimiser step", steps[-1])
    _assert_figures(card, "### run end", run_end)
    settings = _table_after(card, "## Training settings")
    assert settings["β"] == ["0.2"] and settings["T (stages)"] == ["2"]
    config = yaml.safe_load((irft_run / "config.yaml").read_text())
    assert settings["loss"] == [config["loss_type"]]
    assert settings["learning rate"] == ["0.001"]
    data = _table_after(card, "## Data")
    start = [r for r in records if r.get("event") == "run_start"][0]
    assert data["examples"] == [str(start["examples"])]
    assert f"demoalign {library_version()}" in card


def test_the_card_parses_as_a_hugging_face_model_card(irft_run, tiny_model_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(irft_run / "final" / "README.md")
    assert card.data.base_model == str(tiny_model_dir)
    assert card.data.library_name == "transformers"
    assert "demoalign" in card.data.tags


def test_the_card_is_in_final_before_final_is_renamed_into_place(tmp_path, monkeypatch):
    seen = []
    real_replace = runio_module.os.replace

    def replace(src, dst):
        seen.append((Path(dst).name, (Path(src) / "README.md").exists()))
        real_replace(src, dst)

    class Saves:
        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "config.json").write_text("{}")

    monkeypatch.setattr(runio_module.os, "replace", replace)
    runio_module.save_pretrained_atomic(Saves(), Saves(), tmp_path / "final", card="# card\n")
    assert seen == [("final", True)]
    assert (tmp_path / "final" / "README.md").read_text() == "# card\n"


def test_eval_writes_its_figures_into_the_card_and_replaces_them_on_the_next_eval(
    irft_run, tiny_model_dir, tmp_path
):
    final = irft_run / "final"
    figures = []
    for max_pairs in (6, 8):
        results = evaluate(
            models=f"{final},{tiny_model_dir}",
            baseline=str(tiny_model_dir),
            pairs="task:sort",
            max_pairs=max_pairs,
            output_dir=str(tmp_path / "eval"),
            overwrite=True,
            cpu=True,
            bootstrap_resamples=50,
        )
        card = (final / "README.md").read_text()
        assert card.count(EVAL_MARKER) == 1 and card.count("## Evaluation") == 1
        assert any(e["path"] == str(final) for e in results["models"])
        rows = _table_after(card, "## Evaluation")
        written = json.loads((tmp_path / "eval" / "results.json").read_text())
        entry = next(e for e in written["models"] if e["path"] == str(final))
        expected = {
            name: [_as_written(m[k]) for k in ("value", "low", "high")]
            for name, m in entry["metrics"].items()
        }
        assert rows == expected
        deltas = _table_after(card, "Difference from the baseline")
        assert set(deltas) == set(entry["vs_baseline"])
        figures.append(rows)
        assert is_demoalign_card(card) and "## Training results" in card
    assert figures[0] != figures[1], "the second evaluation replaced the first one's figures"
    assert not (tiny_model_dir / "README.md").exists(), "a folder without a demoalign card"


def test_eval_figures_replace_only_their_own_section():
    card = "---\ntags:\n- demoalign\n---\n\n# model\n\ntext\n"
    entry = {"metrics": {"pair_accuracy": {"value": 0.5, "low": 0.25, "high": 0.75}}}
    once = with_eval_figures(card, entry, {"output_dir": "e1"})
    twice = with_eval_figures(once, entry, {"output_dir": "e1"})
    assert once == twice and once.startswith(card.rstrip())
    assert "| pair_accuracy | 0.5 | 0.25 | 0.75 |" in once
    meta, body = split_card(once)
    assert meta == {"tags": ["demoalign"]} and body.lstrip().startswith("# model")
    assert split_card("# no front matter\n") == ({}, "# no front matter\n")
    assert not is_demoalign_card("---\ntags: [other]\n---\n")


@pytest.mark.slow
def test_each_rft_reward_model_has_a_card_with_its_iterations_figures(tiny_model_dir, tmp_path):
    out = tmp_path / "rft"
    train(build_config(RFTConfig, small_rft_values(tiny_model_dir, out)))
    records = read_metrics(out)
    for k in (1, 2):
        card = (out / "iterations" / str(k) / "reward_model" / "README.md").read_text()
        meta = _front_matter(card)
        assert meta["base_model"] == str(tiny_model_dir)
        assert meta["library_name"] == "transformers"
        assert {"demoalign", "rft", "reward-model"} <= set(meta["tags"])
        evals = [r for r in records if r.get("event") == "reward_eval" and r["iteration"] == k]
        _assert_figures(card, "### reward evaluation", evals[-1])
        steps = [
            r
            for r in records
            if "loss" in r and r.get("phase") == "reward" and r.get("iteration") == k
        ]
        _assert_figures(card, "### last reward step", steps[-1])
    final = _front_matter((out / "final" / "README.md").read_text())
    assert "rft" in final["tags"]
