"""The one schema layer: frozen records whose fields declare their type and bounds (pydantic).

Every config section (`vnca.config`) and every JSON artifact (`vnca.contracts`) is a class
decorated with `@record`, a frozen pydantic dataclass: reading a value and checking it are one
step, done by pydantic from the annotations. Records stay standard dataclasses
(`dataclasses.replace`, `asdict` and `fields` work, and `replace` checks the new values too).
A key that the class does not declare is refused.

Field types, strict (a value of another type is refused, never converted; only an int is taken
as a float):

    Bool, Str                 true or false; a string
    Int(least, most)          an integer within bounds (either may be None); Count (>= 0),
                              Positive (>= 1)
    Float(gt=, ge=, le=)      a finite number within bounds; Finite (any finite number)
    Real                      any number, NaN and infinities included
    Literal["a", "b"]         one of the strings
    X | None, list[X], dict[str, X], dict (any object), a nested record

A failure is one line (`explain`), in one vocabulary for every record:

    WHERE: missing 'key' (EXPECTED)
    WHERE: unknown key 'key' (known keys of module.Class: a, b, c)
    WHERE: 'key' must be EXPECTED, got VALUE

`key` is the path from the record read (`splits.test.label_histogram[3]`), WHERE names the file
(or, for a config, the file or `--set` that gave the key), and the line is raised as the
record's `ERROR` (`ConfigError` for the config, `DataError` for the artifacts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, Self, Union

import annotated_types as at
import pydantic
import pydantic.dataclasses
from pydantic import AllowInfNan, Strict, ValidationError
from pydantic_core import PydanticCustomError

from vnca.errors import UserError

# `validate_by_name`: a field with a JSON key that is not a Python name (`p0.1`) is built from
# Python by its name (`p0_1=`) and read from JSON by its key.
_CONFIG = pydantic.ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)
_SCALARS = (bool, int, float, str)
_INVALID = "vnca_invalid"  # the error type of `invalid`
_VALUE_CHARS = 60  # longest text of a bad value quoted in an error line

Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Real = Annotated[float, Strict(), AllowInfNan(True)]


def Int(least: int | None = None, most: int | None = None) -> Any:
    """An integer in [least, most] (a bound that is None is open)."""
    bounds = ([at.Ge(least)] if least is not None else []) + (
        [at.Le(most)] if most is not None else [])
    return Annotated[(int, Strict(), *bounds)]


def Float(gt: float | None = None, ge: float | None = None,
          le: float | None = None) -> Any:
    """A finite number above `gt` (or from `ge`) up to `le`."""
    bounds = [cls(v) for cls, v in ((at.Gt, gt), (at.Ge, ge), (at.Le, le)) if v is not None]
    return Annotated[(float, Strict(), AllowInfNan(False), *bounds)]


Count = Int(0)
Positive = Int(1)
Finite = Float()


def invalid(text: str) -> PydanticCustomError:
    """The error a validator of a record raises: `'key' TEXT` (text without braces)."""
    return PydanticCustomError(_INVALID, text)


# ---------------------------------------------------------------------------------------------
# Records.


class Record:
    """Base of every `@record` class; `ERROR` is the exception its problems raise."""

    ERROR: ClassVar[type[UserError]] = UserError

    @classmethod
    def parse(cls, data: Any, where: str | Callable[[str], str]) -> Self:
        """`data` (plain JSON/YAML values) checked and built into this class; `where(key)` (or
        `where` itself) names the source in the error line."""
        try:
            return cls.__pydantic_validator__.validate_python(data)
        except ValidationError as e:
            raise cls.ERROR(explain(e, cls, where)) from None


@typing.dataclass_transform(kw_only_default=True, frozen_default=True,
                            field_specifiers=(dataclasses.field, pydantic.Field))
def record(cls: type) -> type:
    """Make `cls` (a `Record` subclass) a frozen, keyword-only pydantic dataclass. Building one
    from Python (`Cls(...)`, `dataclasses.replace`) checks it too, and raises `cls.ERROR`."""
    cls = pydantic.dataclasses.dataclass(frozen=True, kw_only=True, config=_CONFIG)(cls)
    for name, tp in field_types(cls).items():
        if (lax := _lax(tp)) is not None:
            raise TypeError(f"{cls.__qualname__}.{name}: {lax} is converted, not checked; use "
                            "the strict types of vnca.schema")
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            owner = type(self)
            raise owner.ERROR(explain(e, owner, _qualified(owner))) from None

    cls.__init__ = __init__
    return cls


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "__pydantic_fields__")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def field_types(cls: type) -> dict[str, Any]:
    """{key: annotation with its bounds} of a record class; a field with a JSON key other than
    its name (`alias`) is listed under both."""
    out = {}
    for name, info in cls.__pydantic_fields__.items():
        tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        out[info.alias or name] = out[name] = tp
    return out


def keys(cls: type) -> list[str]:
    """The keys a record class declares, as they are written (JSON keys), in order."""
    return [info.alias or name for name, info in cls.__pydantic_fields__.items()]


def _lax(tp: Any) -> str | None:
    """The scalar in `tp` that pydantic would convert rather than check, if any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        if args[0] in _SCALARS:
            return None if any(isinstance(m, Strict) for m in args[1:]) else args[0].__name__
        return _lax(args[0])
    if tp in _SCALARS:
        return tp.__name__
    if origin is Literal:
        return None if all(isinstance(a, str) for a in args) else f"{tp}"
    if origin is dict:  # keys: a JSON object's are strings
        args = args[1:]
    return next((lax for a in args if (lax := _lax(a)) is not None), None)


# ---------------------------------------------------------------------------------------------
# One line per problem.


def _strip(tp: Any) -> Any:
    """`tp` without its bounds and without `| None`."""
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
        elif origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
            tp = next(a for a in args if a is not type(None))
        else:
            return tp


def _type_at(root: type, loc: tuple) -> Any:
    """The annotation at the path `loc` below the record class `root` (None if unknown)."""
    tp: Any = root
    for part in loc:
        tp = _strip(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if _is_record(tp):
            tp = field_types(tp).get(part)
        elif origin is list and args and isinstance(part, int):
            tp = args[0]
        elif origin is dict and args:
            tp = args[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _range(b: dict) -> str:
    low = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    if low and "le" in b:
        return f" in {low[0]}{low[1]:g}, {b['le']:g}]"
    if low:
        return f" {'>' if low[0] == '(' else '>='} {low[1]:g}"
    return f" <= {b['le']:g}" if "le" in b else ""


def describe(tp: Any) -> str:
    """What a value of annotation `tp` must be, in words: 'an integer in [1, 10]'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, marks = args[0], args[1:]
        b = {(k := type(m).__name__.lower()): getattr(m, k) for m in marks
             if isinstance(m, (at.Gt, at.Ge, at.Le))}
        if base is int:
            if "ge" in b and "le" in b:
                return f"an integer in [{b['ge']}, {b['le']}]"
            if b.get("ge") == 0:
                return "a non-negative integer"
            return f"an integer >= {b['ge']}" if "ge" in b else "an integer"
        if base is float:
            nan = any(isinstance(m, AllowInfNan) and m.allow_inf_nan for m in marks)
            return ("a number" if nan else "a finite number") + _range(b)
        return describe(base)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(describe(a) for a in inner) + (" or null" if len(inner) < len(args)
                                                          else "")
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict or _is_record(tp):
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def short(value: Any) -> str:
    """A bad value as an error line quotes it: JSON (floats as Python writes them), cut short."""
    text = repr(value) if isinstance(value, float) else json.dumps(value, default=repr)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS] + "...(cut)"


def explain(error: ValidationError, root: type, where: str | Callable[[str], str]) -> str:
    """The first problem of `error` (raised reading the record class `root`) as one line."""
    e = error.errors(include_url=False)[0]
    loc, kind = tuple(e["loc"]), e["type"]
    key = _path(loc)
    at_ = where(key) if callable(where) else where
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        parent = _strip(_type_at(root, loc[:-1]))
        known = (f" (known keys of {_qualified(parent)}: {', '.join(sorted(keys(parent)))})"
                 if _is_record(parent) else "")
        return f"{at_}: unknown key '{key}'{known}"
    expected = _type_at(root, loc)
    if kind in ("missing", "missing_keyword_argument", "missing_argument"):
        return f"{at_}: missing '{key}' ({describe(expected)})"
    if not loc:
        return f"{at_}: expected a JSON object, got {type(e['input']).__name__}"
    if kind == _INVALID:
        return f"{at_}: '{key}' {e['msg']}"
    if expected is None:  # pragma: no cover - an annotation `_type_at` does not walk
        return f"{at_}: '{key}': {e['msg']}"
    return f"{at_}: '{key}' must be {describe(expected)}, got {short(e['input'])}"
