"""Crash safety: a run killed at any point resumes to the same result as an uninterrupted run.

Real ``cliptune tune`` processes are killed with SIGKILL at seeded random points (during a session run,
while a checkpoint is written: after the old one is rotated away, with the new one half written, with it
written but not yet renamed; while a history line is appended; after best_z.npy but before result.json;
and from outside, right after a checkpoint appears), interrupted with SIGINT and SIGTERM, and once the
newest checkpoint is corrupted on disk. One run directory goes through every kill in turn, each
``cliptune tune --resume`` continuing from what the previous process left; the end result (result.json
metrics, best_z.npy, best_prompt.npy, history.jsonl) must equal an uninterrupted run's bit for bit.

In-process kill points are set by a small driver (``DRIVER`` below) that patches the process before it
runs ``cliptune``'s own ``main``: nothing in the package knows about the test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import needs_export

pytestmark = [needs_export, pytest.mark.slow]

SEED = 20261126  # the kill points are random, drawn from this seed (printed when the test runs)
POP, GENS = 10, 32
# small and single-threaded (the uninterrupted reference runs beside the killed chain); SETTINGS go in a
# --config file (4 examples per class has no flag)
SETTINGS = {"per_class": 4}
ARGS = ["--task", "sst2", "--method", "clip", "--k", "2", "--budget", str(POP * GENS), "--popsize", str(POP),
        "--d", "50", "--eval-every", "50", "--checkpoint-every", "2", "--n-buckets", "1",
        "--workers", "1", "--threads", "1", "--quiet"]
RUNS_PER_GEN = 2 * POP  # session runs per generation: k graphs x pop candidates x 1 bucket

DRIVER = r'''
import os, signal, sys, threading
kind, _, n = os.environ.get("CT_KILL", "").partition(":")
n = int(n or 0)
count = [0]
lock = threading.Lock()

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hit():
    with lock:
        count[0] += 1
        return count[0] == n

if kind == "session_run":  # SIGKILL while the n-th session run of this process is in flight
    import onnxruntime as ort
    for name in ("run", "run_with_iobinding"):
        real = getattr(ort.InferenceSession, name)
        def wrapped(self, *a, _real=real, **k):
            if hit():
                threading.Timer(0.0005, die).start()
            return _real(self, *a, **k)
        setattr(ort.InferenceSession, name, wrapped)
elif kind in ("ckpt_rotated", "ckpt_unrenamed"):
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        d, s = os.path.basename(os.fspath(dst)), os.path.basename(os.fspath(src))
        if kind == "ckpt_unrenamed" and d == "checkpoint.json" and s.endswith(".tmp") and hit():
            die()  # the new checkpoint is written and fsynced as a temp file, not yet renamed
        real_replace(src, dst, *a, **k)
        if kind == "ckpt_rotated" and d == "checkpoint.prev.json" and hit():
            die()  # the old checkpoint was moved to checkpoint.prev.json, the new one not yet written
    os.replace = replace
elif kind == "ckpt_half_written":
    import cliptune_ort.fileio as fileio
    real_write = fileio.atomic_write_bytes
    def atomic_write_bytes(path, data):
        if os.path.basename(os.fspath(path)) == "checkpoint.json" and hit():
            tmp = os.path.join(os.path.dirname(os.fspath(path)), ".checkpoint.json.killed.tmp")
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        real_write(path, data)
    fileio.atomic_write_bytes = atomic_write_bytes
elif kind == "history_torn":
    import cliptune_ort.tuner as tuner
    real_append = tuner.append_line
    def append_line(path, line):
        if hit():
            with open(path, "a") as f:
                f.write(line[: len(line) // 2])
            die()
        real_append(path, line)
    tuner.append_line = append_line
elif kind == "before_result":
    import cliptune_ort.tuner as tuner
    real_json = tuner.atomic_write_json
    def atomic_write_json(path, obj):
        if os.path.basename(os.fspath(path)) == "result.json":
            die()  # best_z.npy and best_prompt.npy are written, result.json is not
        real_json(path, obj)
    tuner.atomic_write_json = atomic_write_json

from cliptune_ort.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _start(driver: Path, run_dir: Path, model: Path, kill: str = "", resume: bool = True) -> subprocess.Popen:
    env = {**os.environ, "CT_KILL": kill, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(driver), "tune", *ARGS, "--config", str(driver.parent / "settings.json"),
           "--model-dir", str(model), "--out", str(run_dir)]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _after_new_checkpoints(proc: subprocess.Popen, run_dir: Path, count: int, delay: float, sig: int) -> None:
    """Send ``sig`` ``delay`` s after checkpoint.json has been replaced ``count`` times by this process."""
    ck = run_dir / "checkpoint.json"

    def stamp():
        try:
            return ck.stat().st_mtime_ns, ck.stat().st_ino
        except FileNotFoundError:
            return None

    last, seen = stamp(), 0
    while proc.poll() is None:
        now = stamp()
        if now is not None and now != last:
            seen += 1
            last = now
            if seen >= count:
                time.sleep(delay)
                proc.send_signal(sig)
                return
        time.sleep(0.002)


def _outcome(run_dir: Path) -> dict:
    res = json.loads((run_dir / "result.json").read_text())
    keep = ("train", "dev", "test", "calls", "forward_passes", "generations", "best_train_fitness", "stop_reason",
            "budget")
    return {"result": {k: res[k] for k in keep},
            "best_z": np.load(run_dir / "best_z.npy", allow_pickle=False).tobytes(),
            "best_prompt": np.load(run_dir / "best_prompt.npy", allow_pickle=False).tobytes(),
            "history": (run_dir / "history.jsonl").read_text()}


def _generation(run_dir: Path) -> int | None:
    import warnings

    from cliptune_ort.tuner import load_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = load_checkpoint(run_dir)
    return None if state is None else state["generation"]


def test_killed_anywhere_resumes_to_the_same_result(splade_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    rng = random.Random(SEED)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = _start(driver, ref_dir, splade_dir, resume=False)  # runs beside the killed chain

    # (stage, in-process kill "kind:n" or an outside signal); n and delays drawn from SEED
    stages = [
        ("SIGKILL during a session run", f"session_run:{rng.randint(RUNS_PER_GEN + 5, 3 * RUNS_PER_GEN)}"),
        ("SIGKILL after the old checkpoint was rotated away", f"ckpt_rotated:{rng.randint(2, 3)}"),
        ("SIGKILL with the new checkpoint half written", f"ckpt_half_written:{rng.randint(2, 3)}"),
        ("SIGKILL with the new checkpoint written, not renamed", f"ckpt_unrenamed:{rng.randint(2, 3)}"),
        ("SIGKILL while a history line is appended", "history_torn:1"),
        ("checkpoint.json corrupted on disk, then SIGKILL from outside after a checkpoint",
         ("outside", signal.SIGKILL, rng.randint(1, 2), rng.uniform(0.0, 0.3))),
        ("SIGINT from outside after a checkpoint", ("outside", signal.SIGINT, 1, rng.uniform(0.0, 0.3))),
        ("SIGTERM from outside after a checkpoint", ("outside", signal.SIGTERM, 1, rng.uniform(0.0, 0.3))),
        ("SIGKILL after best_z.npy, before result.json", "before_result:0"),
    ]
    log = []
    for i, (what, kill) in enumerate(stages):
        gen0 = _generation(run_dir) if run_dir.exists() else None
        if what.startswith("checkpoint.json corrupted"):
            ck = run_dir / "checkpoint.json"
            ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 3])  # torn by the disk, say
        if isinstance(kill, str):
            rc, _, err = _wait(_start(driver, run_dir, splade_dir, kill=kill, resume=i > 0))
        else:
            _, sig, count, delay = kill
            proc = _start(driver, run_dir, splade_dir, resume=i > 0)
            _after_new_checkpoints(proc, run_dir, count, delay, sig)
            rc, _, err = _wait(proc)
        log.append({"stage": what, "kill": kill if isinstance(kill, str) else f"{signal.Signals(kill[1]).name} "
                    f"{kill[3]:.3f} s after checkpoint {kill[2]}", "rc": rc, "from_generation": gen0,
                    "to_generation": _generation(run_dir)})
        assert "Traceback" not in err, err
        if "SIGINT" in what or "SIGTERM" in what:
            assert rc == 130, err
            assert f"Resume with: cliptune tune --resume --out {run_dir}" in err, err
        else:
            assert rc == -signal.SIGKILL, (what, rc, err)  # the kill really happened before the run ended
        if what.startswith("checkpoint.json corrupted"):
            assert "is corrupt or truncated (checksum or JSON check failed); resuming from checkpoint.prev.json" in err
        assert not (run_dir / "result.json").exists()
    rc, out, err = _wait(_start(driver, run_dir, splade_dir))  # the last resume finishes the run
    assert rc == 0, err
    assert not list(run_dir.glob(".*.tmp")), "stale temp files left in the run dir"
    rc_ref, _, err_ref = _wait(reference)
    assert rc_ref == 0, err_ref
    print("\nkill points (seed %d):" % SEED)
    for entry in log:
        print(f"  {entry['stage']:<80} {entry['kill']:<36} rc={entry['rc']:<4} "
              f"checkpoint generation {entry['from_generation']} -> {entry['to_generation']}")
    got, want = _outcome(run_dir), _outcome(ref_dir)
    assert got["result"] == want["result"]
    assert got["best_z"] == want["best_z"] and got["best_prompt"] == want["best_prompt"]
    assert got["history"] == want["history"]
    assert want["result"]["calls"] == POP * GENS


def test_corrupt_checkpoint_falls_back_with_a_warning(tmp_path):
    """A truncated or bit-flipped checkpoint.json is detected by its checksum; the previous one is used."""
    from cliptune_ort.errors import CheckpointError
    from cliptune_ort.tuner import CKPT_FORMAT, load_checkpoint, save_checkpoint

    def state(g):
        return {"format": CKPT_FORMAT, "version": 1, "generation": g, "fitness": [[0.5] * 3] * g}

    save_checkpoint(tmp_path, state(2))
    save_checkpoint(tmp_path, state(4))
    assert load_checkpoint(tmp_path)["generation"] == 4
    ck = tmp_path / "checkpoint.json"
    good = ck.read_bytes()
    for broken in (good[:-20], good.replace(b'"generation": 4', b'"generation": 5'), b"", b"\xff\xfe"):
        ck.write_bytes(broken)
        with pytest.warns(RuntimeWarning, match="corrupt or truncated.*resuming from checkpoint.prev.json "
                                                "\\(generation 2\\)"):
            assert load_checkpoint(tmp_path)["generation"] == 2
    save_checkpoint(tmp_path, state(6))  # a corrupt checkpoint.json is not rotated over the good prev
    assert json.loads((tmp_path / "checkpoint.prev.json").read_text())["generation"] == 2
    assert load_checkpoint(tmp_path)["generation"] == 6
    (tmp_path / "checkpoint.json").unlink()  # killed between rotation and write: prev is the checkpoint
    assert load_checkpoint(tmp_path)["generation"] == 2
    (tmp_path / "checkpoint.prev.json").write_text("{}")
    with pytest.raises(CheckpointError, match="checkpoint.prev.json is corrupt or truncated and there is no"):
        load_checkpoint(tmp_path)
