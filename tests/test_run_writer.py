"""Checkpoints and history lines written on the run's background thread: same files, same order, errors
surface in the loop, and what the loop changes after a hand-over never leaks into that checkpoint."""

from __future__ import annotations

import json

import pytest

from cliptune_ort import tuner
from cliptune_ort.tuner import (
    CKPT_FORMAT,
    _checkpoint_text,
    _read_checkpoint,
    _RunWriter,
    load_checkpoint,
)


def _state(g: int) -> dict:
    return {"format": CKPT_FORMAT, "version": 1, "generation": g, "fitness": [[0.25, 1e-17, 1 / 3]] * g,
            "digests": ["ab" * 8] * g, "evals": [{"calls": 3, "dev_metric": 0.5}], "best_z": [0.1, -2.5e-8],
            "elapsed": 1.5, "nested": {"b": 1, "a": [1, 2]}}


def test_checkpoint_text_is_canonical_and_checks(tmp_path):
    state = _state(3)
    path = tmp_path / "c.json"
    path.write_text(_checkpoint_text(state))
    back = _read_checkpoint(path)
    assert back is not None and {k: v for k, v in back.items() if k != "checksum"} == state
    assert list(back)[0] == "checksum"
    path.write_text(path.read_text().replace('"generation": 3', '"generation": 4'))
    assert _read_checkpoint(path) is None  # an edit breaks the checksum
    with pytest.raises(ValueError):  # never a NaN in a checkpoint
        _checkpoint_text({**state, "elapsed": float("nan")})


def test_snapshot_is_taken_at_hand_over(tmp_path, monkeypatch):
    import threading

    gate = threading.Event()
    real = tuner.save_checkpoint

    def held(*a, **kw):  # the thread writes only after the loop has changed the state
        assert gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(tuner, "save_checkpoint", held)
    w = _RunWriter(tmp_path)
    state = _state(2)
    w.checkpoint(state)
    state["fitness"].append([9.0, 9.0, 9.0])  # the loop goes on while the thread writes
    state["digests"].append("cd" * 8)
    state["evals"].append({"calls": 6})
    state["generation"] = 3
    state["best_z"] = [7.0, 7.0]
    gate.set()
    w.close()
    got = load_checkpoint(tmp_path)
    assert got["generation"] == 2 and len(got["fitness"]) == 2 and len(got["digests"]) == 2
    assert len(got["evals"]) == 1 and got["best_z"] == [0.1, -2.5e-8]


def test_rotation_trusts_only_its_own_unchanged_file(tmp_path, monkeypatch):
    reads = []
    real = tuner._read_checkpoint

    def counting(path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(tuner, "_read_checkpoint", counting)
    w = _RunWriter(tmp_path)
    for g in (1, 2, 3):
        w.checkpoint(_state(g))
    w.close()
    assert reads == []  # the file it wrote itself, unchanged: rotated without reading it back
    assert json.loads((tmp_path / "checkpoint.prev.json").read_text())["generation"] == 2
    assert load_checkpoint(tmp_path)["generation"] == 3
    # someone else's (here: corrupt) checkpoint.json is read, and not rotated over the good prev
    (tmp_path / "checkpoint.json").write_text("{torn")
    reads.clear()
    w = _RunWriter(tmp_path)
    w.checkpoint(_state(4))
    w.close()
    assert reads == ["checkpoint.json"]
    assert json.loads((tmp_path / "checkpoint.prev.json").read_text())["generation"] == 2
    assert load_checkpoint(tmp_path)["generation"] == 4


def test_a_write_error_surfaces_in_the_loop_and_stops_later_writes(tmp_path, monkeypatch):
    w = _RunWriter(tmp_path)
    w.checkpoint(_state(1))
    w.history({"calls": 1})
    w.close()

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuner, "atomic_write_text", full_disk)
    w = _RunWriter(tmp_path)
    w.checkpoint(_state(2))
    w._q.join()  # the thread has failed by now
    with pytest.raises(OSError, match="No space left"):
        w.history({"calls": 2})  # the next hand-over raises it
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert (tmp_path / "history.jsonl").read_text() == '{"calls": 1}\n'  # nothing after the failure
    assert load_checkpoint(tmp_path)["generation"] == 1
    w.close(quiet=True)  # a closed writer closes again quietly (the loop's error path)


def test_history_lines_keep_their_field_order(tmp_path):
    entry = {"improved": True, "dev_metric": 0.5, "calls": 10, "extra": 1}
    w = _RunWriter(tmp_path)
    w.history(entry)
    w.close()
    assert list(json.loads((tmp_path / "history.jsonl").read_text())) == ["calls", "dev_metric", "improved", "extra"]
