"""Property-based fuzzing of everything that reads user input: any bytes in a data file and any
record shape either load or raise the package's own error (DataError, a ValueError), never
another exception; any config mapping either builds or raises ValueError.

`make test` runs a few hundred cases; `make fuzz` sets DEMOALIGN_FUZZ_EXAMPLES for 10,000+."""

import gzip
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demoalign.config import CONFIGS, GenerateConfig, build_config, parse_overrides
from demoalign.data import (
    DataError,
    inspect_data,
    load_examples,
    load_preference_pairs,
    load_prompts,
)

EXAMPLES = int(os.environ.get("DEMOALIGN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SUFFIXES = (".jsonl", ".json", ".csv", ".jsonl.gz", ".parquet", ".txt")
READERS = (load_examples, load_preference_pairs, load_prompts, inspect_data)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Records shaped like the real formats, with any values: these reach the parsers, not only the
# JSON decoder.
KEYS = (
    "prompt",
    "response",
    "completion",
    "chosen",
    "rejected",
    "messages",
    "real",
    "instruction",
    "input",
    "output",
    "question",
    "answer",
    "role",
    "content",
)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(("user", "assistant", "system", "x")), "content": json_values}
    ),
    max_size=4,
)


def _read_all(path: Path) -> None:
    for reader in READERS:
        try:
            reader(path)
        except DataError:
            pass  # the package's own, with file and position


def _write(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_any_bytes_load_or_raise_data_error(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        _read_all(_write(folder, "f" + suffix, data))


@FUZZ
@given(
    rows=st.lists(records | json_values, min_size=0, max_size=5),
    suffix=st.sampled_from((".jsonl", ".json")),
)
def test_any_record_shape_loads_or_raises_data_error(rows, suffix):
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    with tempfile.TemporaryDirectory() as folder:
        _read_all(_write(folder, "f" + suffix, text.encode()))


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"messages": messages}), min_size=1, max_size=3))
def test_any_message_list_loads_or_raises_data_error(rows):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with tempfile.TemporaryDirectory() as folder:
        _read_all(_write(folder, "m.jsonl", text.encode()))


config_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=2),
)


@FUZZ
@given(
    method=st.sampled_from(sorted(CONFIGS) + ["generate"]),
    values=st.dictionaries(
        st.sampled_from(
            (
                "model",
                "data",
                "beta",
                "stages",
                "learning_rate",
                "epochs",
                "batch_size",
                "temperature",
                "top_p",
                "greedy",
                "columns",
                "generation_batch_size",
                "max_length",
                "bogus_key",
            )
        ),
        config_values,
        max_size=6,
    ),
)
def test_any_config_mapping_builds_or_raises_value_error(method, values):
    cls = GenerateConfig if method == "generate" else CONFIGS[method]
    try:
        build_config(cls, values)
    except ValueError:
        pass


@FUZZ
@given(pairs=st.lists(st.text(max_size=30), max_size=5))
def test_any_command_line_override_parses_or_raises_value_error(pairs):
    try:
        build_config(CONFIGS["irft"], parse_overrides(pairs))
    except ValueError:
        pass
