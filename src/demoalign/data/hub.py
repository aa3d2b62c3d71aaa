"""Data sets named as `datasets.load_dataset` names them: a Hugging Face Hub id
(`HuggingFaceH4/ultrachat_200k`) or a local dataset repository folder (data files, optionally a
README.md whose YAML front matter lists `configs:`), with a split, a config and a revision.

Spelling: `data=` takes the split, config and revision as the keys `data_split`, `data_config`
and `data_revision`; any data option also takes them as a suffix, `SOURCE[@CONFIG][:SPLIT]`
(e.g. `pairs=Anthropic/hh-rlhf:test`). A path that exists is always read as written.

As with `load_dataset`, a hub id's config is downloaded (all its splits) and cached once by
`datasets`; later runs read the cache.

The split, when none is named: `train`; else the one split whose name starts with `train`
(`train_sft`, `train_prefs`); else the data set's only split; otherwise an error lists the splits.

Offline: with HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) a hub id is read from the Hugging Face
cache only; otherwise one short request checks that the hub answers before `datasets` (which
retries for about half a minute) is asked, so an unreachable hub fails within seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import DataError

HUB_TIMEOUT_S = 5.0
SPLIT_RULE = (
    "`train`, else the one split whose name starts with `train` (train_sft, train_prefs), "
    "else the only split"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".gz", ".parquet", ".csv", ".arrow")
_SUFFIX = re.compile(r"(?P<path>[^@:]+?)(?:@(?P<config>[^@:]+))?(?::(?P<split>[^@:]+))?")


@dataclass(frozen=True)
class DataRef:
    """A data option: a path or hub id, and which split, config and revision of it."""

    path: str
    split: str = ""
    config: str = ""
    revision: str = ""

    def __str__(self) -> str:
        text = self.path + (f"@{self.config}" if self.config else "")
        text += f":{self.split}" if self.split else ""
        return text + (f" (revision {self.revision})" if self.revision else "")


def data_ref(spec: Any, split: str = "", config: str = "", revision: str = "") -> DataRef:
    """The DataRef of a data option, its `@CONFIG:SPLIT` suffix merged with the explicit keys."""
    if isinstance(spec, DataRef):
        return spec
    text = str(spec)
    found = {"path": text, "config": None, "split": None}
    suffixed = _SUFFIX.fullmatch(text)
    if suffixed and not text.startswith("task:") and not Path(text).expanduser().exists():
        found = suffixed.groupdict()
    for key, value in (("split", split), ("config", config)):
        if value and found[key] and found[key] != value:
            raise DataError(text, f"names {key} {found[key]!r} but data_{key}={value!r}")
    return DataRef(
        found["path"], split or found["split"] or "", config or found["config"] or "", revision
    )


def looks_like_hub_id(path: str) -> bool:
    """`name` or `owner/name`, not a file name: what to look for on the hub when no such path
    exists here."""
    return bool(_HUB_ID.fullmatch(path)) and not path.lower().endswith(_FILE_SUFFIXES)


def choose_split(ref: DataRef, available: list[str]) -> str:
    """The split `ref` names, or the one SPLIT_RULE picks; an error lists the splits."""
    if ref.split:
        if ref.split in available:
            return ref.split
        raise DataError(ref, f"no split {ref.split!r}: the data set has splits {available}")
    if "train" in available:
        return "train"
    trains = [s for s in available if s.startswith("train")]
    if len(trains) == 1:
        return trains[0]
    if len(available) == 1:
        return available[0]
    # The suffix works in every data option and in `demoalign data inspect` alike.
    named = replace(ref, split=(trains or available)[0], revision="")
    raise DataError(
        ref,
        f"cannot choose a split: the data set has splits {available} and the rule ({SPLIT_RULE}) "
        f"picks none; name one as SOURCE:SPLIT, e.g. {named} (or data_split=NAME beside data=)",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unreachable(ref: DataRef, reason: str = "") -> DataError:
    """The one error for a hub id that cannot be read here; no `reason`: offline mode is on."""
    why = (
        f"the Hugging Face Hub cannot be reached ({reason})"
        if reason
        else "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and the Hugging Face "
        "cache holds no copy"
    )
    cached = "; a copy already in the Hugging Face cache is read with HF_HUB_OFFLINE=1"
    return DataError(
        ref,
        f"data set not reachable: no such local file or folder, and {why}. Where there is "
        f"network, download it (hf download {ref.path} --repo-type dataset --local-dir FOLDER) "
        f"and pass that FOLDER or a data file instead{cached if reason else ''}",
    )


def _check_hub_answers(ref: DataRef) -> None:
    """One request without retries: the data set exists and the hub answers, or a DataError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().dataset_info(ref.path, revision=ref.revision or None, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        raise DataError(ref, f"gated data set ({_first_line(exc)})") from None
    except RepositoryNotFoundError:
        raise DataError(
            ref,
            "no such local file or folder, and no such data set on the Hugging Face Hub "
            "(or it is private: log in with `hf auth login`)",
        ) from None
    except RevisionNotFoundError:
        raise DataError(ref, f"the data set has no revision {ref.revision!r}") from None
    except HfHubHTTPError as exc:
        raise unreachable(ref, _first_line(exc)) from None
    except Exception as exc:  # the HTTP client's connection errors have no common public base
        raise unreachable(ref, _first_line(exc)) from None


def load_split(ref: DataRef, on_hub: bool) -> tuple[Any, DataRef, list[str]]:
    """(the chosen split as a `datasets.Dataset`, `ref` with that split, notes), read the way
    `datasets.load_dataset(path, name=config, revision=revision, split=split)` reads it."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    if on_hub and not offline:
        _check_hub_answers(ref)
    try:
        builder = datasets.load_dataset_builder(
            ref.path, name=ref.config or None, revision=ref.revision or None
        )
    except ConnectionError as exc:
        raise unreachable(ref, "" if offline else _first_line(exc)) from None
    except Exception as exc:  # datasets raises many kinds; each is about this source
        raise DataError(ref, _not_loadable(on_hub, exc)) from None
    available = list(builder.config.data_files or {}) or list(builder.info.splits or {})
    split = choose_split(ref, available)
    try:
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split)
    except ConnectionError as exc:
        raise unreachable(ref, "" if offline else _first_line(exc)) from None
    except Exception as exc:
        raise DataError(ref, f"cannot read split {split!r} ({_first_line(exc)})") from None
    chosen = DataRef(ref.path, split, builder.config.name, ref.revision)
    notes = [f"config {builder.config.name!r}, split {split!r} of {available}"]
    if ref.revision and not on_hub:
        notes.append(f"data_revision={ref.revision} ignored: it applies to hub ids")
    return dataset, chosen, notes


def _not_loadable(on_hub: bool, exc: Exception) -> str:
    if on_hub:
        return f"cannot load the data set ({_first_line(exc)})"
    return (
        "folder is neither a dataset saved with datasets.save_to_disk nor a dataset repository "
        f"(data files, optionally a README.md listing `configs:`) ({_first_line(exc)})"
    )
