"""Property-based tests (hypothesis) of the config parser and of the few-shot sampler's input checks.

Config parser (``build_config`` / ``_coerce``): every valid setting round-trips (through keyword
arguments, their string forms as typed on a command line, and a JSON config file); every other value,
whatever its type, raises ConfigError and never another exception. Sampler: test_data.py already checks
the sampler's output properties (counts, disjointness, BBT's walk, determinism); here: whatever labels,
seeds and sizes it is handed, it answers with a split, a DataError or a ConfigError, nothing else.
"""

from __future__ import annotations

import json
import math
import string
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cliptune_ort.config import TuneConfig, _coerce, build_config
from cliptune_ort.data import bbt_sample_indices
from cliptune_ort.errors import ConfigError, DataError
from cliptune_ort.tasks import TASKS

FIELDS = [f.name for f in fields(TuneConfig)]

_path_text = st.text(alphabet=string.ascii_letters + string.digits + "/._- ", min_size=1, max_size=30).filter(
    lambda s: s.strip() != "")
_text = st.text(max_size=40)
_pos = st.integers(1, 10**6)
_nonneg = st.integers(0, 10**6)

#: one strategy of *valid* values per setting; a new TuneConfig field without one fails test_every_field_has_a_strategy
VALID = {
    "task": st.sampled_from(sorted(TASKS)),
    "method": st.sampled_from(["clip", "bbt", "manual"]),
    "optimizer": st.sampled_from(["cma", "random"]),
    "cma_eigen": st.sampled_from(["auto", "sync", "ahead"]),
    "seed": st.integers(0, 2**31 - 1),
    "model_dir": st.none() | _path_text,
    "data_dir": st.none() | _path_text,
    "data_source": st.sampled_from(["local", "hub"]),
    "per_class": _pos,
    "k": st.integers(1, 64),
    "p": st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    "mixture": st.sampled_from(["mean_loss", "mean_logits", "assign"]),
    "loss": st.none() | st.sampled_from(["ce", "hinge"]),
    "margin": st.floats(0.0, 1e6),
    "d": _pos,
    "popsize": st.integers(3, 1000),  # 2 only below d = 300 (tests/test_cma_eigen.py)
    "sigma0": st.floats(1e-6, 1e6),
    "budget": st.integers(1000, 10**7),  # >= popsize
    "budget_unit": st.sampled_from(["calls", "forward"]),
    "eval_every": _pos,
    "patience": _nonneg,
    "checkpoint_every": _pos,
    "device": st.sampled_from(["auto", "cpu", "cuda"]),
    "cands_per_call": _nonneg,
    "iobinding": st.sampled_from(["auto", "on", "off"]),
    "precision": st.sampled_from(["fp32", "int8", "fp16"]),
    "cuda_graph": st.booleans(),
    "n_buckets": _pos,
    "eval_chunk": _pos,
    "threads": _nonneg,
    "workers": _nonneg,
    "max_len": _nonneg,
    "template": st.none() | _text,
    "verbalizer": st.none() | _text,
    "verbalizer_policy": st.sampled_from(["error", "first"]),
    "plot": st.booleans(),
}

#: anything JSON (or a Python caller) can hand over
ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from([10**400, -10**400, 2**63, -2**63 - 1, "1e400", "-inf", "nan", " 12 ", "0x10", "1_000",
                       "1.5", "true", "no", "", "\0", "sst2\0", "9" * 5000]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def test_every_field_has_a_strategy():
    assert sorted(VALID) == sorted(FIELDS)


@st.composite
def valid_settings(draw):
    names = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS)))
    return {n: draw(VALID[n]) for n in names}


def _config_file(obj) -> Path:
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8")
    with f:
        json.dump(obj, f)
    return Path(f.name)


@settings(max_examples=300, deadline=None)
@given(valid_settings())
def test_valid_settings_round_trip(values):
    cfg = build_config(**values)
    for name, v in values.items():
        got = getattr(cfg, name)
        assert got == v and type(got) is type(v), (name, v, got)
    assert build_config(**cfg.to_dict()) == cfg
    path = _config_file(cfg.to_dict())
    try:
        assert build_config(path) == cfg
        assert build_config(path, **values) == cfg  # flags over the file: same values, same config
    finally:
        path.unlink()


def _as_typed(v):
    """How a value looks when typed on a command line or written as a string in a config file."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


@settings(max_examples=200, deadline=None)
@given(valid_settings())
def test_string_forms_of_numbers_and_flags_parse_to_the_same_value(values):
    typed = {n: _as_typed(v) for n, v in values.items() if isinstance(v, (bool, int, float))}
    assert build_config(**typed) == build_config(**{n: values[n] for n in typed})


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FIELDS), value=ANY)
def test_any_value_is_a_config_or_a_config_error(name, value):
    try:
        coerced = _coerce(name, value)
    except ConfigError as e:
        assert "\n" not in str(e) and name in str(e)
        coerced = None
    else:
        default = getattr(TuneConfig, name)
        if default is not None and coerced is not None:
            assert type(coerced) is type(default), (name, value, coerced)
    try:
        cfg = build_config(**{name: value})
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 1000
    else:
        assert value is None or getattr(cfg, name) == coerced
    path = _config_file({name: value})
    try:
        build_config(path)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 1000
    finally:
        path.unlink()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_config_file_is_a_config_or_a_config_error(content):
    f = tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False)
    with f:
        f.write(content)
    try:
        build_config(f.name)
    except ConfigError as e:
        assert "\n" not in str(e)
    finally:
        Path(f.name).unlink()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), ANY, min_size=1, max_size=4))
def test_unknown_names_are_config_errors(extra):
    assume(set(extra) - set(FIELDS))
    path = _config_file(extra)
    try:
        with pytest.raises(ConfigError, match="unknown setting"):
            build_config(path)
    finally:
        path.unlink()


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["budget", "popsize", "d", "eval_every", "checkpoint_every", "per_class",
                              "n_buckets", "eval_chunk"]),
       value=st.integers(-10**6, 0) | st.floats(allow_nan=True, allow_infinity=True).filter(
           lambda x: not (math.isfinite(x) and x.is_integer() and x > 0)))
def test_non_positive_counts_are_refused(field, value):
    with pytest.raises(ConfigError):
        build_config(**{field: value})


@settings(max_examples=200, deadline=None)
@given(p=st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0.0 < x < 1.0))
def test_p_outside_the_open_unit_interval_is_refused(p):
    with pytest.raises(ConfigError, match="p must be in \\(0, 1\\)"):
        build_config(p=p)


# ------------------------------------------------------------------ the sampler's input checks


@settings(max_examples=300, deadline=None)
@given(labels=st.lists(st.integers(-3, 6), max_size=80), n_labels=st.integers(-1, 5), per_class=st.integers(-1, 4),
       seed=st.integers(-5, 2**33))
def test_sampler_answers_any_input_with_a_split_or_a_typed_error(labels, n_labels, per_class, seed):
    try:
        train, dev = bbt_sample_indices(labels, n_labels, seed, per_class)
    except (DataError, ConfigError) as e:
        assert "\n" not in str(e)
        return
    # accepted: the inputs were valid, and the split has the promised shape
    assert 0 <= seed < 2**32 and per_class >= 1 and n_labels >= 1
    assert all(0 <= y < n_labels for y in labels)
    assert len(train) == len(dev) == per_class * n_labels and not set(train) & set(dev)


@settings(max_examples=100, deadline=None)
@given(seed=st.one_of(st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none(),
                      st.integers(max_value=-1), st.integers(min_value=2**32)))
def test_sampler_refuses_seeds_that_are_not_uint32(seed):
    with pytest.raises(ConfigError, match="expected an int in 0..2\\*\\*32-1"):
        bbt_sample_indices([0, 1] * 40, 2, seed, 4)


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.integers(0, 2), min_size=24, max_size=60), seed=st.integers(0, 2**32 - 1))
def test_sampler_sees_only_labels_and_seed(labels, seed):
    """The split is a function of (labels, seed, per_class): the same as a numpy array or a list."""
    assume(all(labels.count(c) >= 4 for c in range(3)))
    a = bbt_sample_indices(labels, 3, seed, 2)
    b = bbt_sample_indices(np.asarray(labels, dtype=np.int64), 3, seed, 2)
    c = bbt_sample_indices(tuple(labels), 3, np.uint32(seed), 2)
    assert a == b == c
