"""A model id that is neither a local folder nor reachable on the hub ends in one `error:` line
(exit 2) within seconds, before anything is created; the hub client's minute of retries never
starts. Run without network: the hub's offline switch, or an endpoint nothing listens on."""

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DOLLY

HUB_ID = "EleutherAI/pythia-160m"
# Port 9 (discard) on this machine: nothing listens, so a connection is refused at once.
CLOSED_ENDPOINT = "http://127.0.0.1:9"


def _no_network_env(tmp_path: Path, offline: bool) -> dict:
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        env.pop(key, None)
    env["HF_HUB_CACHE"] = str(tmp_path / "empty_hub_cache")  # the id is in no cache
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = CLOSED_ENDPOINT
    return env


def _commands(tmp_path: Path, tiny_model_dir: Path) -> dict[str, tuple[list[str], Path]]:
    """Each command that resolves a model id: (its arguments, what it must not create)."""
    run_out, eval_out, gen_out = tmp_path / "run", tmp_path / "eval", tmp_path / "gen.jsonl"
    small = [f"data={DOLLY}", "max_examples=8", "cpu=true", f"output_dir={run_out}"]
    return {
        "irft model=": (["irft", f"model={HUB_ID}", *small], run_out),
        "rft reward_model=": (
            ["rft", f"model={tiny_model_dir}", f"reward_model={HUB_ID}", *small],
            run_out,
        ),
        "eval models=": (
            ["eval", f"models={HUB_ID}", "task=sort", "cpu=true", f"output_dir={eval_out}"],
            eval_out,
        ),
        "generate model=": (
            ["generate", f"model={HUB_ID}", f"data={DOLLY}", "cpu=true", f"output={gen_out}"],
            gen_out,
        ),
    }


CASES = [(name, False) for name in ("irft model=", "rft reward_model=", "eval models=")]
CASES += [("generate model=", False), ("irft model=", True)]


# `demoalign ARGS` timed from the command's own start: torch and transformers are imported first,
# since importing them takes from several to tens of seconds on a busy machine.
TIMED_CLI = """
import sys, time
import demoalign.eval.evaluate, demoalign.run
from demoalign.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(f"seconds={time.perf_counter() - started:.3f}")
sys.exit(code)
"""


@pytest.mark.parametrize("command, offline", CASES)
def test_unreachable_hub_id_is_one_error_line_in_seconds(
    command, offline, tmp_path, tiny_model_dir
):
    args, must_not_exist = _commands(tmp_path, tiny_model_dir)[command]
    done = subprocess.run(
        [sys.executable, "-c", TIMED_CLI, *args],
        env=_no_network_env(tmp_path, offline),
        capture_output=True,
        text=True,
        timeout=300,
    )
    error = done.stderr.strip()
    assert done.returncode == 2, error
    assert len(error.splitlines()) == 1, error  # no retry warnings, no traceback
    assert error.startswith("error: ") and HUB_ID in error
    assert "local folder" in error and ".gguf" in error and "HF_HUB_OFFLINE" in error
    assert ("hub was not asked" if offline else CLOSED_ENDPOINT) in error
    seconds = float(done.stdout.strip().removeprefix("seconds="))
    assert seconds < 10, f"{seconds:.1f} s (the hub client's retries took over a minute)"
    assert not must_not_exist.exists()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub's settings for this process: an empty cache, online, the default hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def _use_endpoint(monkeypatch, hub, endpoint: str) -> None:
    """HF_ENDPOINT as the hub client reads it at import (its URL template is built then)."""
    monkeypatch.setattr(hub, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def test_unroutable_endpoint_answers_within_seconds(hub, monkeypatch):
    """An address that may swallow packets (a connect that never completes) is given up after
    one short try; wherever it does answer, the answer is a clear line too."""
    from demoalign.models import HUB_PROBE_TIMEOUT_S, check_model_path

    _use_endpoint(monkeypatch, hub, "http://10.255.255.1")
    started = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        check_model_path(HUB_ID)
    assert time.perf_counter() - started < HUB_PROBE_TIMEOUT_S + 5
    message = str(caught.value)
    assert "\n" not in message and f"model={HUB_ID}" in message
    assert "http://10.255.255.1" in message and "HF_HUB_OFFLINE=1" in message


def test_offline_mode_never_asks_the_hub(hub, monkeypatch):
    import huggingface_hub

    from demoalign.models import check_model_path

    def no_request(*args, **kwargs):
        raise AssertionError("the hub was asked in offline mode")

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_request)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set, so the hub was not asked"):
        check_model_path(HUB_ID, "reward_model")


def test_a_model_in_the_hub_cache_loads_without_the_hub(hub, monkeypatch, tmp_path):
    import huggingface_hub

    from demoalign.models import check_model_path

    snapshot = Path(hub.HF_HUB_CACHE) / "models--EleutherAI--pythia-160m"
    commit = "0" * 40
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    (snapshot / "snapshots" / commit / "config.json").write_text("{}")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(commit)

    def no_request(*args, **kwargs):
        raise AssertionError("a cached model needs no look at the hub")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_request)
    check_model_path(HUB_ID)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    check_model_path(HUB_ID)


class _NotFound(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub does for a repository (or a file) it does not have."""

    error_code = "RepoNotFound"

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _NoConfig(_NotFound):
    error_code = "EntryNotFound"


@pytest.mark.parametrize(
    "handler, says",
    [(_NotFound, "has no such model"), (_NoConfig, "without a config.json")],
    ids=["no_repository", "no_config"],
)
def test_a_model_missing_on_the_hub_says_so(hub, monkeypatch, handler, says):
    from demoalign.models import check_model_path

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _use_endpoint(monkeypatch, hub, f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(ValueError, match=says) as caught:
            check_model_path("no-owner/no-such-model", "models")
    finally:
        server.shutdown()
    assert "models=no-owner/no-such-model" in str(caught.value)
