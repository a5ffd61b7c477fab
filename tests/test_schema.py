"""The schema layer (`vnca.schema`): strict typed records, and one error line for every
problem, whether the record is a config section or a JSON artifact."""

from __future__ import annotations

import dataclasses
import functools
import pickle
from typing import Literal

import pydantic
import pytest

from vnca import config, contracts, schema
from vnca.errors import ConfigError, DataError, UserError


class Thing(schema.Record):
    ERROR = DataError


@schema.record
class Inner(Thing):
    n: schema.Count
    share: schema.Float(ge=0.0, le=1.0) = 0.5


@schema.record
class Outer(Thing):
    name: schema.Str
    inner: Inner
    kind: Literal["a", "b"] = "a"
    rows: list[Inner] = dataclasses.field(default_factory=list)
    by_split: dict[str, schema.Positive] = dataclasses.field(default_factory=dict)
    low: schema.Float(gt=0.0) | None = None
    p0_1: schema.Finite | None = pydantic.Field(default=None, alias="p0.1")


@pytest.mark.parametrize("data, line", [
    ({"inner": {"n": 1}}, "f: missing 'name' (a string)"),
    ({"name": "x"}, "f: missing 'inner' (an object)"),
    ({"name": "x", "inner": {}}, "f: missing 'inner.n' (a non-negative integer)"),
    ({"name": 3, "inner": {"n": 1}}, "f: 'name' must be a string, got 3"),
    ({"name": "x", "inner": {"n": "1"}}, "f: 'inner.n' must be a non-negative integer, got \"1\""),
    ({"name": "x", "inner": {"n": True}}, "f: 'inner.n' must be a non-negative integer, got true"),
    ({"name": "x", "inner": {"n": 1.0}}, "f: 'inner.n' must be a non-negative integer, got 1.0"),
    ({"name": "x", "inner": {"n": 1, "share": 2}},
     "f: 'inner.share' must be a finite number in [0, 1], got 2"),
    ({"name": "x", "inner": {"n": 1, "share": float("nan")}},
     "f: 'inner.share' must be a finite number in [0, 1], got nan"),
    ({"name": "x", "inner": {"n": 1}, "rows": [{"n": 1}, {"n": -1}]},
     "f: 'rows[1].n' must be a non-negative integer, got -1"),
    ({"name": "x", "inner": {"n": 1}, "by_split": {"test": 0}},
     "f: 'by_split.test' must be an integer >= 1, got 0"),
    ({"name": "x", "inner": {"n": 1}, "kind": "c"}, "f: 'kind' must be one of \"a\", \"b\", got \"c\""),
    ({"name": "x", "inner": {"n": 1}, "low": 0},
     "f: 'low' must be a finite number > 0 or null, got 0"),
    ({"name": "x", "inner": {"n": 1, "m": 2}},
     "f: unknown key 'inner.m' (known keys of test_schema.Inner: n, share)"),
    ({"name": "x", "inner": 3}, "f: 'inner' must be an object, got 3"),
    ({"name": "x" * 100, "inner": {"n": "y" * 100}},
     "f: 'inner.n' must be a non-negative integer, got \"" + "y" * 59 + "...(cut)"),
    ([1], "f: expected a JSON object, got list"),
])
def test_every_problem_is_one_line_in_one_vocabulary(data, line):
    with pytest.raises(DataError) as e:
        Outer.parse(data, "f")
    assert str(e.value) == line


def test_a_record_is_a_frozen_dataclass_checked_however_it_is_built():
    o = Outer.parse({"name": "x", "inner": {"n": 2}, "p0.1": 1}, "f")
    assert o.inner == Inner(n=2) and o.p0_1 == 1.0 and type(o.p0_1) is float
    assert Outer(name="x", inner=Inner(n=2), p0_1=1.0) == o  # by name in Python
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.name = "y"
    assert dataclasses.replace(o, name="y").name == "y"
    with pytest.raises(DataError, match=r"^test_schema.Outer: 'inner.n' must be a non-negative"):
        dataclasses.replace(o, inner={"n": -1})
    with pytest.raises(DataError, match=r"^test_schema.Inner: missing 'n' "):
        Inner()
    assert [f.name for f in dataclasses.fields(Outer)][:2] == ["name", "inner"]
    assert schema.keys(Outer)[-1] == "p0.1"


def test_a_lax_field_type_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match=r"Lax.n: int is converted, not checked"):
        @schema.record
        class Lax(Thing):
            n: int

    with pytest.raises(TypeError, match=r"Lax2.xs: float is converted"):
        @schema.record
        class Lax2(Thing):
            xs: list[float | None]


def test_the_error_class_is_the_records():
    with pytest.raises(ConfigError):
        config.ModelConfig(z_dim=0)
    with pytest.raises(DataError):
        contracts.Growth(n_examples=-1, n_frames=0)
    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError)


def test_a_config_is_hashable_picklable_and_a_cache_key():
    """The train step caches its compiled programs on the config (`functools.lru_cache`)."""
    cfg = config.load(["configs/nondoubling.yaml", "configs/smoke.yaml"])
    again = config.loads(config.dump(cfg))
    assert hash(cfg) == hash(again) and pickle.loads(pickle.dumps(cfg)) == cfg
    calls = []
    cached = functools.lru_cache(lambda c: calls.append(c))
    cached(cfg), cached(again)
    assert len(calls) == 1
