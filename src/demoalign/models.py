"""Loading models: the policy (causal LM + tokenizer), reward models, and the eval-mode switch."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .gguf import find_gguf, load_gguf


@contextmanager
def eval_mode(model):
    """model.eval() for the block, then the training mode it had before."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _looks_local(path: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else, or a path whose first part exists
    here, is meant as a local folder (and must not fall through to a hub lookup that retries)."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        return True
    return Path(path.split("/")[0]).exists()


def check_model_path(path: str, what: str = "model") -> None:
    """A clear error for a model that cannot be a model folder or a .gguf file, before anything
    is created."""
    if find_gguf(path) is not None:
        return
    local = Path(path).expanduser()
    if local.is_file():
        raise ValueError(
            f"{what}={path} is a file; expected a model folder "
            "(config.json, weights and tokenizer files)"
        )
    if local.is_dir() and not (local / "config.json").exists():
        raise ValueError(f"{what}={path} is a folder without config.json; not a model folder")
    if not local.exists() and _looks_local(path):
        raise ValueError(f"{what}={path}: no such model folder")
    if not local.exists():
        problem = hub_problem(path)
        if problem is not None:
            raise ValueError(
                f"{what}={path}: not a local folder or .gguf file, and {problem}; pass a local "
                f"model folder (e.g. what `hf download {path} --local-dir DIR` fetches where "
                f"there is network) or a .gguf file, or {_hub_switch()}"
            )


def _hub_switch() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to fetch it from the hub"
    return "set HF_HUB_OFFLINE=1 to skip the hub (models already in its cache load then)"


# One look at the hub, without retries, before anything loads: the hub client retries a missing
# file for about a minute when the network is down.
HUB_PROBE_TIMEOUT_S = 5.0


def hub_problem(repo_id: str) -> str | None:
    """Why the hub id `repo_id` cannot be loaded (one line), or None when its config.json is in
    the local hub cache or the hub has it. Honours HF_HUB_OFFLINE: then only the cache counts."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as exc:
        return f"not a valid hub id either ({_first_line(exc)})"
    if isinstance(cached, str):
        return None
    if constants.is_offline_mode():
        return "not in the local hub cache (HF_HUB_OFFLINE is set, so the hub was not asked)"
    hub = constants.ENDPOINT
    try:
        url = hf_hub_url(repo_id, "config.json", endpoint=hub)
        get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S, endpoint=hub)
    except GatedRepoError:
        return f"gated on the hub {hub}: ask for access there and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return f"the hub {hub} has no such model (if it is private, log in: `hf auth login`)"
    except EntryNotFoundError:
        return f"the hub {hub} has it without a config.json (a .gguf there: download it)"
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 404:
            return f"the hub {hub} has no such model (HTTP 404 for its config.json)"
        return f"the hub {hub} answered HTTP {status} for its config.json"
    except Exception as exc:  # the network error types differ between hub client versions
        return f"the hub {hub} could not be reached ({type(exc).__name__}: {_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def prepare_tokenizer(tokenizer, path: str | Path):
    """EOS required; no pad token means pad = EOS (labels come from lengths, not from pad ids,
    so EOS is still learnt)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no EOS token; responses must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # not saved by transformers 5; generation pads left by hand
    return tokenizer


def load_model_and_tokenizer(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hugging Face folder (or hub id), or a `.gguf` file or a folder
    holding one (dequantised; needs the `gguf` extra). float32 unless asked otherwise, whatever
    the checkpoint's dtype (transformers 5 defaults to "auto"): training keeps fp32 master
    weights, since bf16 ones would lose updates at the paper's lr 5e-7 (autocast does the bf16
    compute); generation alone may load in half precision."""
    if find_gguf(path) is not None:
        model, tokenizer = load_gguf(path)
        return model.to(dtype), prepare_tokenizer(tokenizer, path)
    check_model_path(path)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path), path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def generation_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`demoalign generate`'s `dtype`: auto is bfloat16 on a GPU that has it, else float32."""
    if choice == "auto":
        cuda = device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, choice)


def check_reward_model(path: str) -> None:
    """A trained reward model gives one score per sequence."""
    check_model_path(path, "reward_model")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"reward_model={path}: cannot read its config ({exc})") from None
    if cfg.num_labels != 1:
        raise ValueError(
            f"reward_model={path} has num_labels={cfg.num_labels}; a reward model "
            "must give one score per sequence (AutoModelForSequenceClassification "
            "with num_labels=1)"
        )


def load_reward_model(path: str, same_ids_as=None, seed: int | None = None):
    """(model, tokenizer): an AutoModelForSequenceClassification with one score, in fp32.

    seed=None: a trained reward model (num_labels must be 1) with its own tokenizer, cut from the
    left so the response's end is kept (`demoalign eval`). With a seed: RFT's reward model, whose
    scalar head may be new (initialised under `seed`, e.g. from the policy's own weights);
    `same_ids_as` is the policy's tokenizer, which it must share, since both read the same ids."""
    if seed is None:
        check_reward_model(path)
    tokenizer = _reward_tokenizer(path, same_ids_as)
    if seed is not None:
        torch.manual_seed(seed)  # the new head's initialisation
    with _quiet_load_report(seed is not None):
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _quiet_load_report(quiet: bool):
    """RFT starts its reward model from a causal LM: transformers' load report of the new
    scalar head (`score.weight | MISSING ... Consider training`) is expected there and only alarms
    a user, so its warnings are off while it loads (errors, e.g. a size mismatch, still raise)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _reward_tokenizer(path: str, same_ids_as):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if same_ids_as is None:
            raise
        return same_ids_as
    if same_ids_as is not None:
        if tokenizer.get_vocab() != same_ids_as.get_vocab():
            raise ValueError(
                f"reward_model={path} has a different tokenizer from the policy; "
                "both must read the same ids"
            )
        return same_ids_as
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"  # keep the response's end
    return tokenizer
