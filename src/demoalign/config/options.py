"""How an option is declared: once, with its type, default, help and the limits that hold for it
alone, in an option group or a command config; every other config that takes it reuses that
declaration and may give it another default (`@options(name=default)`)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields

# option name -> (qualified name of the class that declares it, its dataclass Field)
DECLARED: dict[str, tuple[str, object]] = {}
OPTION_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def opt(default, help: str, *, choices: tuple = (), minimum=None, above=None):
    """An option's one declaration. `choices`: the values it may take; `minimum` / `above`: it
    must be >= / > that number. These checks travel with the option to every config that takes it.
    """
    metadata = {"help": help, "choices": tuple(choices), "minimum": minimum, "above": above}
    return field(default=default, metadata=metadata)


def options(**defaults):
    """Class decorator that makes an option group or a command config a dataclass.

    The class's own `name: type = opt(...)` lines are the only declarations of those names (a
    second one anywhere raises TypeError at import). `defaults` gives options declared elsewhere
    this class's default, with their declared type and help: an option the class inherits keeps
    its place; any other (taken from a group the class does not otherwise need) is added before
    the class's own options."""

    def make(cls):
        _set_defaults(cls, defaults)
        cls = dataclass(cls)
        _register(cls, set(defaults))
        return cls

    return make


def _set_defaults(cls, defaults: dict) -> None:
    own = inspect.get_annotations(cls)  # the class's own, not its bases'
    if not defaults:
        return
    added = {}
    for name, value in defaults.items():
        if name not in DECLARED:
            raise TypeError(f"{cls.__name__}: option `{name}` is declared nowhere before it")
        if name in own:
            raise TypeError(f"{cls.__name__}: `{name}` is both declared and given a default")
        declared = DECLARED[name][1]
        added[name] = declared.type
        setattr(cls, name, field(default=value, metadata=declared.metadata))
    cls.__annotations__ = {**added, **own}


def _register(cls, reused: set) -> None:
    where = f"{cls.__module__}.{cls.__qualname__}"
    own = inspect.get_annotations(cls)
    for f in fields(cls):
        if f.name not in own or f.name in reused:
            continue
        if f.name in DECLARED and DECLARED[f.name][0] != where:
            raise TypeError(
                f"option `{f.name}` is declared twice: in {DECLARED[f.name][0]} and {where}; "
                "declare it once and give other defaults with @options(name=default)"
            )
        DECLARED[f.name] = (where, f)


def check_types_and_finite(config) -> None:
    """Every option has its declared type (a config built in Python skips the CLI's parsing) and
    every float is finite: `beta=nan` or `learning_rate=inf` would train on garbage."""
    for f in fields(config):
        target = f.type if isinstance(f.type, type) else OPTION_TYPES.get(f.type)
        value = getattr(config, f.name)
        if target is None:
            continue
        ok = isinstance(value, target) and not (target is not bool and isinstance(value, bool))
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"config key `{f.name}` expects {target.__name__}, got {value!r}")
        if target is float and not math.isfinite(value):
            raise ValueError(f"config key `{f.name}` must be a finite number, got {value!r}")


def check_declared_limits(config) -> None:
    """The `choices`, `minimum` and `above` of every option's declaration."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name}={value!r}: choose one of {', '.join(meta['choices'])}")
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ValueError(f"{f.name} must be >= {meta['minimum']}, got {value!r}")
        if meta.get("above") is not None and value <= meta["above"]:
            raise ValueError(f"{f.name} must be > {meta['above']}, got {value!r}")


@options()
class Options:
    """The root of every group and config. Each group's `validate` calls super().validate() first,
    so a config checks the types and declared limits of all its options, then each group's own
    rules in the order of its fields, then its command's."""

    def validate(self) -> None:
        check_types_and_finite(self)
        check_declared_limits(self)
