"""The run folder never hurts the user: marker, lock, inputs, working directory, file modes."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from demoalign.runio import (
    LOCK,
    MARKER,
    RunFolderError,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    live_lock_owner,
    release_lock,
    strict_json,
)


def _user_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {
        "config.yaml": "mine: 1\n",
        "main.py": "print(1)\n",
        "d.jsonl": "{}\n",
    }.items():
        (folder / name).write_text(text)
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_refuses_a_folder_it_did_not_create(tmp_path):
    names = _user_files(tmp_path / "mine")
    with pytest.raises(RunFolderError, match="not a demoalign run folder"):
        claim_output_dir(tmp_path / "mine", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == names


def test_overwrite_refuses_the_working_directory_even_when_marked(tmp_path, monkeypatch):
    names = _user_files(tmp_path)
    (tmp_path / MARKER).write_text("{}")
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path), str(tmp_path.parent)):
        if target == str(tmp_path.parent):
            (tmp_path.parent / MARKER).write_text("{}")
        with pytest.raises(RunFolderError, match="working directory"):
            claim_output_dir(target, overwrite=True)
    assert set(names) <= {p.name for p in tmp_path.iterdir()}


def test_overwrite_refuses_a_folder_holding_an_input(tmp_path):
    run = claim_output_dir(tmp_path / "run", overwrite=False)
    release_lock(run)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    with pytest.raises(RunFolderError, match="input"):
        claim_output_dir(run, overwrite=True, inputs=[str(run / "final")])
    assert (run / "final" / "config.json").exists()


def test_without_overwrite_a_non_empty_folder_is_refused_and_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a").write_text("a")
    with pytest.raises(RunFolderError, match="overwrite=true"):
        check_output_dir(tmp_path / "x", overwrite=False)
    (tmp_path / "f").write_text("f")
    with pytest.raises(RunFolderError, match="is a file"):
        check_output_dir(tmp_path / "f", overwrite=True)


def test_a_live_lock_keeps_a_second_run_out_and_a_stale_one_is_taken_over(tmp_path):
    run = claim_output_dir(tmp_path / "run", overwrite=False)
    (run / "metrics.jsonl").write_text("{}\n")
    assert live_lock_owner(run) == f"pid {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(RunFolderError, match="live run"):
        claim_output_dir(run, overwrite=True)
    assert (run / "metrics.jsonl").exists(), "a live run's files must survive"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert live_lock_owner(run) is None
    claim_output_dir(run, overwrite=True)
    assert not (run / "metrics.jsonl").exists() and (run / MARKER).exists()
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    release_lock(run)
    assert not (run / LOCK).exists()


def test_a_lock_from_another_host_counts_as_live(tmp_path):
    run = claim_output_dir(tmp_path / "run", overwrite=False)
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(RunFolderError, match="elsewhere.example"):
        check_output_dir(run, overwrite=True)


def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644


def test_metrics_stay_strict_json():
    line = strict_json({"loss": float("nan"), "grad_norm": float("inf"), "step": 3})
    assert json.loads(line) == {"loss": None, "grad_norm": None, "step": 3}
    assert "NaN" not in line and "Infinity" not in line
