"""How a setting is declared once: its default, its help, its validation and whether the
calibration depends on it, all on the dataclass field (``setting(...)``).

Everything that lists settings (the CLI's help and choices, the calibration identity, the sidecar
descriptions, the validation) reads these declarations instead of repeating them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import Field, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from bids_app.errors import UsageError


@dataclass(frozen=True)
class Rule:
    """A validity check and the words that describe it (``"in [0, 1]"``)."""

    test: Callable[[Any], bool]
    words: str


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A number (or every number of a tuple) in the interval."""
    def inside(x: Any) -> bool:
        return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and (x > low if low_open else x >= low) and (x < high if high_open else x <= high))
    words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(lambda v: all(inside(x) for x in v) if isinstance(v, tuple) else inside(v), words)


def at_least(low: float) -> Rule:
    """A finite number (or every number of a tuple) >= low."""
    return Rule(between(low, math.inf, high_open=True).test, f"a finite number >= {low:g}")


def above(low: float) -> Rule:
    """A finite number (or every number of a tuple) > low: a learning rate, a voxel size."""
    return Rule(between(low, math.inf, low_open=True, high_open=True).test, f"a finite number > {low:g}")


def whole(low: int, high: int | None = None) -> Rule:
    """An integer (or every integer of a tuple) in [low, high]; ``high`` None: no upper bound."""
    def inside(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low and (high is None or x <= high)
    words = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: all(inside(x) for x in v) if isinstance(v, tuple) else inside(v), words)


def count(n: int, low: int = 1) -> Rule:
    """A tuple of exactly ``n`` integers, each >= low."""
    return Rule(lambda v: isinstance(v, tuple) and len(v) == n and all(whole(low).test(x) for x in v),
                f"{n} integers >= {low}")


def sized(n: int, rule: Rule) -> Rule:
    """A tuple of exactly ``n`` values, each passing ``rule`` (``3 numbers, each a finite number > 0``)."""
    return Rule(lambda v: isinstance(v, tuple) and len(v) == n and rule.test(v), f"{n} values, each {rule.words}")


def increasing(n: int, rule: Rule) -> Rule:
    """A tuple of ``n`` strictly increasing numbers, each passing ``rule`` (percentiles: low < high)."""
    return Rule(lambda v: sized(n, rule).test(v) and all(a < b for a, b in zip(v, v[1:])),
                f"{n} increasing numbers {rule.words}")


def non_empty(rule: Rule) -> Rule:
    """A non-empty tuple whose values pass ``rule``."""
    return Rule(lambda v: isinstance(v, tuple) and len(v) > 0 and rule.test(v), f"one or more values {rule.words}")


def each_of(choices: tuple[Any, ...]) -> Rule:
    """A tuple whose every value is one of ``choices`` (``choices`` itself tests a whole value)."""
    return Rule(lambda v: isinstance(v, tuple) and all(x in choices for x in v),
                f"a list of {', '.join(map(str, choices))}")


def matches(pattern: str, words: str) -> Rule:
    """A string (or every string of a tuple) that matches ``pattern`` entirely."""
    def fits(x: Any) -> bool:
        return isinstance(x, str) and re.fullmatch(pattern, x) is not None
    return Rule(lambda v: all(fits(x) for x in v) if isinstance(v, tuple) else fits(v), words)


#: ``setting(REQUIRED, ...)``: a setting without a default (the positional arguments).
REQUIRED: Any = dataclasses.MISSING


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, rule: Rule | None = None,
            calibrated: bool = False, sidecar: str | None = None) -> Any:
    """A dataclass field with everything else the app needs to know about it.

    ``calibrated``: the calibrated threshold holds only for this value (part of the calibration's
    identity and of every output's sidecar). ``sidecar``: the sidecar key (default: CamelCase).
    ``None`` is valid where the field's type allows it. A dict default is copied per instance.
    """
    metadata = {"help": help, "choices": choices, "rule": rule, "calibrated": calibrated, "sidecar": sidecar}
    if default is REQUIRED:
        return field(metadata=metadata)
    if isinstance(default, dict):  # a mutable default: each instance gets its own copy
        return field(default_factory=functools.partial(dict, default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Checked:
    """Base of a settings section: validates every declared field on construction, naming it by
    ``SECTION`` (``segmentation.counterfactual.strengths must be ...``), then what no single
    declaration can say (``check_combined``)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)
        self.check_combined()

    def check_combined(self) -> None:
        """Rules that tie several settings of the section together (UsageError); none by default."""


def field_at(cls: type, path: str) -> Field:
    """The declaration of the setting at a dotted path below ``cls`` (``segmentation.residual.polarity``)."""
    *sections, name = path.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return declared(cls)[name]


def set_path(values: dict[str, Any], path: str, value: Any) -> None:
    """Put ``value`` at a dotted path of a nested dict of settings, creating sections as needed."""
    *sections, key = path.split(".")
    for section in sections:
        values = values.setdefault(section, {})
        if not isinstance(values, dict):
            raise UsageError(f"setting {path!r}: {section!r} must be a mapping of settings")
    values[key] = value


def help_text(f: Field) -> str:
    """The field's help with its default, for ``--help``."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
        if isinstance(default, tuple) else ("off" if default is None else default)
    return f"{f.metadata['help']} (default: {shown})"


def check_fields(obj: Any, where: str) -> None:
    """Validate every declared field of a settings dataclass; UsageError (64) names the setting."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
        if value is None and type(None) in typing.get_args(hints[f.name]):
            continue
        name = f"{where}.{f.name}" if where else f.name
        if choices is not None and value not in choices:
            raise UsageError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if rule is not None and not rule.test(value):
            raise UsageError(f"{name} must be {rule.words}, got {_shown(value)}")


def declared(cls: type) -> dict[str, Field]:
    """The fields of a settings dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def calibrated_values(obj: Any) -> dict[str, Any]:
    """The ``calibrated`` fields of a settings tree, nested by section (JSON-ready)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            inner = calibrated_values(value)
            if inner:
                values[f.name] = inner
        elif f.metadata.get("calibrated"):
            values[f.name] = to_jsonable(value)
    return values


def sidecar_values(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``calibrated`` fields of a settings tree under their sidecar keys (flat, CamelCase),
    leaving out the sections named in ``skip``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if f.name not in skip:
                values.update(sidecar_values(value))
        elif f.metadata.get("calibrated"):
            values[f.metadata.get("sidecar") or camel_case(f.name)] = to_jsonable(value)
    return values


def camel_case(name: str) -> str:
    """``detection_inset_mm`` -> ``DetectionInsetMM``."""
    return "".join(part.upper() if part in ("mm", "mm3") else part.capitalize() for part in name.split("_"))


def build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls`` from a nested dict of JSON/YAML/CLI values; unknown keys and bad types are refused."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"unknown setting {where}{unknown[0]!r}; known settings here: {', '.join(sorted(names))}")
    kwargs = {name: coerce(hints[name], value, f"{where}{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"bad settings for {where or 'run'}: {exc}") from exc


def coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert a JSON/YAML/CLI value to the annotated type, or raise a UsageError naming the setting."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise UsageError(f"setting {where!r} must be a mapping")
        return build_dataclass(hint, value, f"{where}.")
    if origin is tuple:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"setting {where!r} must be a list")
        return tuple(coerce(args[0], item, where) for item in value)
    if origin is not None and origin.__name__ == "Mapping" or hint is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"setting {where!r} must be a mapping")
        return dict(value)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise UsageError(f"setting {where!r} must be a path")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"setting {where!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                return int(str(value))
            except ValueError:
                raise UsageError(f"setting {where!r} must be an integer, got {value!r}") from None
        return value
    if hint is float:
        if isinstance(value, bool):
            raise UsageError(f"setting {where!r} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"setting {where!r} must be a number, got {value!r}") from None
    if hint is str and not isinstance(value, str):
        raise UsageError(f"setting {where!r} must be a string, got {value!r}")
    return value


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict of settings as ``{"section.name": value}`` (to compare and name differences)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def to_jsonable(value: Any) -> Any:
    """Paths as strings, tuples as lists, recursively."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)

