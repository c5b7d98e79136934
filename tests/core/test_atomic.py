"""Atomic writes: an interrupted write leaves the old file intact and no temporary files behind."""

import json

import numpy as np
import pytest

from mokd.core import atomic


def test_write_json_and_numpy_round_trip(tmp_path):
    path = atomic.write_json(tmp_path / "deep" / "r.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    atomic.save_numpy(tmp_path / "x.npy", array)
    assert np.array_equal(np.load(tmp_path / "x.npy"), array)


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "r.json"
    atomic.write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
