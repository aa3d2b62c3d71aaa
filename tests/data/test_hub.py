"""Data sets named as `datasets.load_dataset` names them: a local dataset repository folder
(parquet files and a README.md whose YAML front matter lists `configs:`) read through the same
builder path as a hub id, the split rule, and a hub id that cannot be reached failing at once with
one error line (the libraries' offline settings, or an endpoint that refuses connections)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demoalign.data import DataError, Example, load_examples, load_preference_pairs
from demoalign.data.hub import DataRef, data_ref, looks_like_hub_id
from demoalign.data.sources import HELDOUT_SEED, demonstrations, preference_pairs

SRC = Path(__file__).resolve().parents[2] / "src"
REFUSING_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, refused at once


def chat(tag: str, n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{tag} question {i}"},
                {"role": "assistant", "content": f"{tag} answer {i}"},
            ]
        }
        for i in range(n)
    ]


def prefs(tag: str, n: int) -> list[dict]:
    return [
        {"prompt": f"{tag} prompt {i}", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}
        for i in range(n)
    ]


def write_repo(root: Path, configs: dict[str, dict[str, list[dict]]], default: str) -> Path:
    """A dataset repository as on the hub: one parquet file per config and split, and a README
    whose front matter maps each config's splits to its files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = []
    for name, splits in configs.items():
        files = []
        for split, rows in splits.items():
            rel = f"{name}/{split}-00000-of-00001.parquet"
            (root / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), root / rel)
            files.append({"split": split, "path": rel})
        entry = {"config_name": name, "data_files": files}
        if name == default:
            entry["default"] = True
        card.append(entry)
    front = yaml.safe_dump({"configs": card}, sort_keys=False)
    (root / "README.md").write_text(f"---\n{front}---\n# A test data set\n", encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow files `datasets` prepares go under the test's folder, not the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def repo(tmp_path) -> Path:
    """Two configs: `sft` (default; train_sft, test_sft, test_gen) and `prefs` (train,
    train_prefs, test)."""
    return write_repo(
        tmp_path / "repo",
        {
            "sft": {"train_sft": chat("train_sft", 6), "test_sft": chat("test_sft", 3)}
            | {"test_gen": chat("test_gen", 2)},
            "prefs": {"train": prefs("train", 4), "train_prefs": prefs("train_prefs", 5)}
            | {"test": prefs("test", 2)},
        },
        default="sft",
    )


def test_the_default_config_and_its_one_train_split(repo):
    examples, report = load_examples(repo)
    assert [e.prompt for e in examples] == [f"train_sft question {i}" for i in range(6)]
    assert (report.file_format, report.record_format) == ("dataset_repo", "messages")
    assert report.path == f"{repo}@sft:train_sft"
    assert "split 'train_sft' of ['train_sft', 'test_sft', 'test_gen']" in report.summary()


def test_config_and_split_read_as_load_dataset_reads_them(repo):
    import datasets

    rows = list(datasets.load_dataset(str(repo), name="prefs", split="test"))
    pairs = load_preference_pairs(f"{repo}@prefs:test")
    assert pairs == [(Example(r["prompt"], r["chosen"]), r["rejected"]) for r in rows]
    assert pairs == load_preference_pairs(DataRef(str(repo), split="test", config="prefs"))
    # `train` is preferred to the other split whose name starts with train
    assert load_preference_pairs(f"{repo}@prefs")[0][0].prompt == "train prompt 0"
    examples, summary, _ = demonstrations(str(repo), data_split="test_gen", limit=1)
    assert examples == [Example("test_gen question 0", "test_gen answer 0")]
    assert "reading stopped at limit=1" in summary
    held_out = preference_pairs(f"{repo}@prefs:train_prefs", 2, HELDOUT_SEED, task_count=200)
    assert [e.prompt for e, _ in held_out] == ["train_prefs prompt 0", "train_prefs prompt 1"]


def test_a_bad_split_or_config_lists_what_there_is(repo, tmp_path):
    with pytest.raises(
        DataError, match=r"no split 'dev': .*\['train_sft', 'test_sft', 'test_gen'\]"
    ):
        load_examples(data_ref(repo, split="dev"))
    with pytest.raises(DataError, match=r"'nope' not found. Available: \['sft', 'prefs'\]"):
        load_examples(data_ref(repo, config="nope"))
    two = write_repo(
        tmp_path / "two", {"c": {"train_sft": chat("a", 2), "train_gen": chat("b", 2)}}, "c"
    )
    with pytest.raises(DataError, match=r"cannot choose a split.*\['train_sft', 'train_gen'\]"):
        load_examples(two)
    # the hint is a spelling every data option and `demoalign data inspect` take as it is
    with pytest.raises(DataError, match=f"e.g. {re.escape(str(two))}:train_sft ") as hint:
        load_examples(two)
    assert load_examples(str(hint.value).split("e.g. ")[1].split(" ")[0])[0][0].prompt
    with pytest.raises(DataError, match="names split 'test' but data_split='train'"):
        data_ref(f"{repo}:test", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*neither a dataset saved with.*save_to_disk"):
        load_examples(tmp_path / "empty")


def test_split_options_on_a_file_are_noted_and_a_saved_dict_takes_its_split(tmp_path):
    import datasets

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prefs("f", 2)), encoding="utf-8")
    _, report = load_examples(data_ref(path, split="train_sft"))
    assert "data_split=train_sft ignored" in report.summary()
    saved = datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(prefs("tp", 3))}
        | {"test_prefs": datasets.Dataset.from_list(prefs("xp", 1))}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert load_examples(tmp_path / "saved")[0][0].prompt == "tp prompt 0"
    assert load_examples(f"{tmp_path / 'saved'}:test_prefs")[0][0].prompt == "xp prompt 0"


def test_what_is_taken_for_a_hub_id():
    assert looks_like_hub_id("Anthropic/hh-rlhf") and looks_like_hub_id("imdb")
    assert looks_like_hub_id("HuggingFaceH4/ultrachat_200k")
    for path in ("missing.jsonl", "data/train.parquet", "a/b/c", "/abs/x", "./rel", "x.csv"):
        assert not looks_like_hub_id(path), path
    assert data_ref("HuggingFaceH4/ultrafeedback_binarized@default:test_prefs") == DataRef(
        "HuggingFaceH4/ultrafeedback_binarized", "test_prefs", "default"
    )
    assert data_ref("task:sort:3") == DataRef("task:sort:3")


def test_an_unreachable_hub_fails_at_once_for_pairs(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", REFUSING_ENDPOINT)
    with pytest.raises(DataError, match="Anthropic/hh-rlhf:test: data set not reachable"):
        preference_pairs("Anthropic/hh-rlhf:test", None, HELDOUT_SEED, task_count=200)


UNREACHABLE = {
    "offline": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    "refused": {"HF_ENDPOINT": REFUSING_ENDPOINT, "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""},
}

# Imports first (torch, transformers: slow on a busy machine), then the timed command itself.
TIMED_MAIN = """
import json, sys, time
import demoalign.cli, demoalign.run
start = time.monotonic()
code = demoalign.cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "seconds": time.monotonic() - start}))
"""


@pytest.mark.parametrize("how", sorted(UNREACHABLE))
def test_the_cli_gives_one_error_line_within_seconds_and_creates_nothing(
    how, tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    args = ["sft", f"model={tiny_model_dir}", "data=HuggingFaceH4/ultrachat_200k"]
    args += ["data_split=train_sft", f"output_dir={out}", "cpu=true", "show_progress=false"]
    env = {**os.environ, **UNREACHABLE[how], "HF_HOME": str(tmp_path / "hf_home")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", TIMED_MAIN, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert result["code"] == 2, done.stderr
    assert result["seconds"] < 10
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert "HuggingFaceH4/ultrachat_200k:train_sft: data set not reachable" in errors[0]
    assert "hf download HuggingFaceH4/ultrachat_200k" in errors[0]
    assert not out.exists()


def test_offline_a_hub_id_is_read_from_the_cache(repo, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE: no request at all, and a copy `datasets` cached earlier is what is read
    (here the cache of a local folder, moved to where the hub id `someone/repo` is cached)."""
    import datasets
    import huggingface_hub

    expected = load_preference_pairs(f"{repo}@prefs:test")
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    (cache / "repo").rename(cache / "someone___repo")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", REFUSING_ENDPOINT)
    assert load_preference_pairs("someone/repo@prefs:test") == expected
    with pytest.raises(DataError, match="offline mode is on .* the Hugging Face cache holds no"):
        load_preference_pairs("someone/other:test")
