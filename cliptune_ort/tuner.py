"""The tuning loop: CMA-ES proposes z, the thinned networks score A z, the best prompt is kept.

Data flow (DESIGN.md)::

    ask -> Z [pop, d] -> A Z -> prompts [pop, L, hidden] -> K sessions -> logits [K, pop, n, labels]
    tell <- fitness [pop] <- mixture over K <- loss per (k, candidate)
    every eval_every calls: best z so far -> full graph on dev -> keep best -> test once at the end

A run directory holds: config.json (resolved), history.jsonl (one line per dev evaluation),
checkpoint.json (+ checkpoint.prev.json), best_z.npy [d], best_prompt.npy [L, hidden],
result.json and convergence.png.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import TuneConfig
from .data import FewShot, load_fewshot
from .encoding import Encoded, PromptTokenizer
from .engine import DevicePrompts, Engine, FixedBatch
from .errors import CheckpointError, ConfigError, NumericError, TaskError
from .fileio import append_line, atomic_write_bytes, atomic_write_json, atomic_write_text, file_stamp
from .losses import loss_fn, metric_fn
from .manifest import Manifest, load_manifest
from .models import resolve_model_dir
from .optim import digest, make_optimizer
from .tasks import TaskSpec, get_task

CKPT = "checkpoint.json"
CKPT_PREV = "checkpoint.prev.json"


def projection(seed: int, d: int, n_prompt: int, hidden: int, emb_std: float, sigma0: float) -> np.ndarray:
    """The fixed random projection, transposed: At [d, L*hidden], entries N(0, s^2),
    s = emb_std / (sqrt(d) * sigma0) (BBT). prompt = z @ At."""
    s = emb_std / (math.sqrt(d) * sigma0)
    rng = np.random.default_rng([seed, 1])
    at = rng.standard_normal((d, n_prompt * hidden), dtype=np.float32)
    at *= np.float32(s)
    return at


@dataclass
class Workspace:
    """Everything a run needs, built once: task, model, sessions, fixed batches, projection."""

    cfg: TuneConfig
    task: TaskSpec
    manifest: Manifest
    engine: Engine
    ptok: PromptTokenizer
    verbalizer_ids: np.ndarray
    fewshot: FewShot
    train: FixedBatch
    dev: FixedBatch
    test: FixedBatch | None
    at: np.ndarray | None  # [d, L*hidden]
    loss: str
    graphs_train: list[int]
    setup_seconds: dict[str, float] | None = None  # where prepare() spent its time, by phase

    def prompts(self, z: np.ndarray, host: bool = False) -> np.ndarray | DevicePrompts:
        """Z [pop, d] -> prompts [pop, L, hidden]: made on the engine's device where its runs are bound and
        stacked (``Engine.project``), else (or with ``host``) the float32 array ``z @ At``."""
        return self.engine.host_projection(z) if host else self.engine.project(z)

    def zero_prompt(self) -> np.ndarray:
        return np.zeros((1, self.manifest.n_prompt, self.manifest.hidden), dtype=np.float32)


def eval_batch(engine: Engine, enc: Encoded, chunk: int) -> FixedBatch:
    """Dev/test sets: length-sorted chunks of at most ``chunk`` rows (bounded memory, little padding)."""
    return engine.prepare(enc, n_buckets=max(1, math.ceil(len(enc) / chunk)))


def eval_chunk_rows(cfg: TuneConfig, manifest: Manifest, train_rows: int) -> int:
    """Rows per dev/test chunk: ``cfg.eval_chunk``; for packed graphs (no padded token computed up to the last
    layer) at least the stacked train call's ``popsize`` x train rows, whose memory the run needs anyway, so
    that fewer shapes run once (SST-2's 872 test rows: 2 chunks instead of 4; a new binding's first run seems
    to cost tens of ms on an H100, see _finish)."""
    if manifest.packed:
        return max(cfg.eval_chunk, cfg.popsize * train_rows)
    return cfg.eval_chunk


def task_for(cfg: TuneConfig) -> TaskSpec:
    """The task spec with the run's template/verbalizer overrides applied (checked by TaskSpec)."""
    import dataclasses

    task = get_task(cfg.task)
    changes: dict[str, Any] = {}
    if cfg.template is not None:
        changes["template"] = cfg.template
    if cfg.verbalizer is not None:
        words = tuple(w.strip() for w in cfg.verbalizer.split(","))
        if len(words) != task.n_labels or not all(words):
            raise ConfigError(f"verbalizer {cfg.verbalizer!r} has {len(words)} words, task {task.name} has "
                              f"{task.n_labels} labels ({', '.join(task.label_names)}): give one word per label")
        changes["verbalizer"] = words
    if not changes:
        return task
    try:
        return dataclasses.replace(task, **changes)
    except TaskError as e:
        raise ConfigError(f"--template/--verbalizer do not fit task {task.name}: {str(e).split('; fix')[0]}; pass a "
                          "--template with <P> first, {text} (and {text_b} for pair tasks) and one [MASK]") from None


def _discard_engine(opening) -> None:
    """Wait for an engine still opening on another thread and close it (set-up failed meanwhile)."""
    with contextlib.suppress(Exception):  # the set-up's own error is the one to report
        opening.result().close()


def prompt_tokenizer(cfg: TuneConfig, manifest: Manifest) -> PromptTokenizer:
    """The run's tokenizer: the model dir's, with its prompt placeholders, cut at ``cfg.max_len`` (0 = the model's
    positions; more than those is refused)."""
    max_pos = int(manifest.data["model"]["max_positions"])
    if cfg.max_len > max_pos:
        raise ConfigError(f"max_len {cfg.max_len} is more than the model's {max_pos} positions: pass --max-len "
                          f"{max_pos} or less (0 = the model's limit)")
    return PromptTokenizer(manifest.tokenizer_path, manifest.data["tokenizer"], manifest.n_prompt,
                           manifest.data["placeholder_ids"], cfg.max_len or max_pos)


def prepare(cfg: TuneConfig, model_dir: Path | None = None, splits: bool = True, draw: bool = True) -> Workspace:
    """Everything a run needs, built once; ``Workspace.setup_seconds`` says where the time went (model dir
    resolved and verified, data read and tokenised, sessions made, projection drawn).

    Using a finished run's prompt needs less: ``splits=False`` reads no data (``fewshot``, ``train``, ``dev``
    and ``test`` are None: predict), ``draw=False`` draws no projection (``at`` is None: eval, predict, deploy;
    roberta-large's is 100 MB)."""
    phases: dict[str, float] = {}
    t = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - t[0], 4)
        t[0] = now

    task = task_for(cfg)
    model_dir = model_dir or resolve_model_dir(cfg.model_dir, cfg.k, cfg.p, cfg.precision)
    manifest = load_manifest(model_dir)
    lap("manifest")
    if cfg.method == "clip":
        if cfg.k > manifest.k:
            raise ConfigError(f"k={cfg.k} thinned networks asked for, but {model_dir} has {manifest.k}: "
                              f"re-export with --k {cfg.k} or lower --k")
        graphs_train = list(range(1, cfg.k + 1))
    else:
        graphs_train = [0]
    # the sessions open on a thread of their own, and the projection is drawn on another, while this one reads
    # and tokenises the data (ONNX Runtime builds a session with the GIL released; numpy's Generator draws
    # without it). The draw took 0.38 s and the data 0.85 s one after the other in run 9's bbt set-up.
    use_prompt = cfg.method != "manual"
    opener = ThreadPoolExecutor(2, thread_name_prefix="cliptune-setup")
    opening = opener.submit(
        Engine, manifest, sorted(set(graphs_train) | {0}), device=cfg.device, cands_per_call=cfg.cands_per_call,
        threads=cfg.threads, workers=cfg.workers, iobinding={"auto": None, "on": True, "off": False}[cfg.iobinding],
        cuda_graph=cfg.cuda_graph)
    drawing = opener.submit(projection, cfg.seed, cfg.d, manifest.n_prompt, manifest.hidden, manifest.embedding_std,
                            cfg.sigma0) if use_prompt and draw else None
    opener.shutdown(wait=False)
    try:
        fewshot = load_fewshot(task, cfg.seed, data_dir=cfg.data_dir, per_class=cfg.per_class,
                               source=cfg.data_source) if splits else None
        lap("data")
        ptok = prompt_tokenizer(cfg, manifest)
        verb = ptok.verbalizer_ids(task.verbalizer, cfg.verbalizer_policy)
        lap("tokenizer")
        enc_train = enc_dev = enc_test = None
        if fewshot is not None:
            enc_train = ptok.encode(task.template, fewshot.train, use_prompt)
            enc_dev = ptok.encode(task.template, fewshot.dev, use_prompt)
            enc_test = ptok.encode(task.template, fewshot.test, use_prompt) if fewshot.test is not None else None
        lap("encode")
        at = drawing.result() if drawing is not None else None
        lap("projection")  # what the draw took beyond the work above
    except BaseException:
        _discard_engine(opening)
        raise
    engine = opening.result()  # the sessions' own error (provider, damaged graph), if any
    lap("sessions")  # what opening the sessions took beyond the work above (Engine.open_wall_seconds: all of it)
    try:
        train = dev = test = None
        if enc_train is not None:
            # packed-attention graphs skip padding themselves: the whole train set in one call
            train = engine.prepare(enc_train, 1 if manifest.packed else cfg.n_buckets)
            chunk = eval_chunk_rows(cfg, manifest, len(enc_train))
            dev = eval_batch(engine, enc_dev, chunk)
            test = eval_batch(engine, enc_test, chunk) if enc_test is not None else None
        if at is not None:
            engine.enable_projection(at)
    except BaseException:
        engine.close()
        raise
    lap("batches")
    return Workspace(cfg, task, manifest, engine, ptok, verb, fewshot, train, dev, test, at,
                     cfg.loss or task.loss, graphs_train, phases)


def score(ws: Workspace, prompts: np.ndarray) -> np.ndarray:
    """Fitness [pop] (lower is better) of prompts [pop, L, hidden]: the mixture of rewards."""
    cfg, eng, labels = ws.cfg, ws.engine, ws.train.labels
    pop = prompts.shape[0]

    def loss(logits):
        return loss_fn(ws.loss, logits, labels, cfg.margin)

    if cfg.method != "clip":
        return loss(eng.logits(0, prompts, ws.train, ws.verbalizer_ids))
    if cfg.mixture == "assign":
        fit = np.empty(pop)
        nets = len(ws.graphs_train)
        parts = [(g, np.arange(j, pop, nets)) for j, g in enumerate(ws.graphs_train) if j < pop]
        res = eng.logits_multi([(g, prompts[idx]) for g, idx in parts], ws.train, ws.verbalizer_ids)
        for (g, idx), logits in zip(parts, res):
            fit[idx] = loss(logits)
        return fit
    per_net = eng.logits_multi([(g, prompts) for g in ws.graphs_train], ws.train, ws.verbalizer_ids)
    if cfg.mixture == "mean_logits":
        return loss(np.mean(per_net, axis=0))
    return np.mean([loss(x) for x in per_net], axis=0)


def evaluate(ws: Workspace, prompt: np.ndarray | DevicePrompts | None, batch: FixedBatch) -> dict[str, float]:
    """Full-network metric and loss of one prompt [L, hidden] (None: no soft prompt; or one candidate's
    :class:`DevicePrompts`) on ``batch``."""
    if prompt is None:
        p = ws.zero_prompt()
    elif isinstance(prompt, DevicePrompts):
        p = prompt
    else:
        p = prompt.reshape(1, ws.manifest.n_prompt, ws.manifest.hidden).astype(np.float32)
    logits = ws.engine.logits(0, p, batch, ws.verbalizer_ids)[0]
    return {"metric": metric_fn(ws.task.metric, logits, batch.labels),
            "loss": float(loss_fn(ws.loss, logits, batch.labels, ws.cfg.margin)), "n": batch.n}


# ---------------------------------------------------------------- checkpoints


CKPT_FORMAT = "cliptune-checkpoint"
CKPT_VERSION = 1


def _checksum(state: dict) -> str:
    """sha256 of a checkpoint's canonical JSON (sorted keys), without its own checksum."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _checkpoint_text(state: dict) -> str:
    """The checkpoint file: ``checksum`` first, then the state's canonical JSON (sorted keys), serialised
    once; :func:`_checksum` of the parsed file gives the same string back."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, allow_nan=False)
    head = '{"checksum": "' + hashlib.sha256(canon.encode()).hexdigest() + '"'
    return head + (", " + canon[1:] if body else "}") + "\n"


def save_checkpoint(run_dir: Path, state: dict, written: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """Write checkpoint.json atomically (temp file, fsync, rename, fsync dir); the previous *valid*
    checkpoint becomes checkpoint.prev.json. Returns the new file's stamp (device, inode, size, times).

    At every instant of a write the run dir holds a valid checkpoint.json or checkpoint.prev.json: a
    kill between the rotation and the rename leaves the previous one as checkpoint.prev.json, and a
    corrupt checkpoint.json is overwritten, never rotated over a good checkpoint.prev.json. The current
    file is read back to check it, unless its stamp equals ``written`` (the stamp this process got when it
    wrote it: unchanged since, so still valid).
    """
    from .fileio import fsync_dir

    text = _checkpoint_text(state)
    cur = run_dir / CKPT
    if cur.exists() and ((written is not None and file_stamp(cur) == written) or _read_checkpoint(cur) is not None):
        cur.replace(run_dir / CKPT_PREV)
        fsync_dir(run_dir)
    atomic_write_text(cur, text)
    return file_stamp(cur)


#: history.jsonl's fields in the order they are written (a checkpoint stores them sorted)
HISTORY_FIELDS = ("calls", "forward_passes", "generation", "best_train_fitness", "dev_metric", "dev_loss",
                  "best_dev_metric", "improved")


def _history_line(entry: dict) -> str:
    return json.dumps({**{k: entry[k] for k in HISTORY_FIELDS if k in entry}, **entry})


class _RunWriter:
    """A run's checkpoints and history lines, written in order on one background thread.

    The loop hands over a snapshot and goes on scoring while the thread serialises, fsyncs and renames
    (13 ms a checkpoint at the end of an 8,000-call run on the 2-core machine, about 18 ms on run 7's card
    host, and an fsync per history line). Files are
    written exactly as before, and in the same order; an error on the thread is raised in the loop at
    its next hand-over or at :meth:`close`, which waits for everything handed over (the run's end, a
    SIGINT checkpoint, ``stop_after_generations``, an error). The snapshot copies the lists the loop
    appends to (fitness, digests, evals); every other value the loop replaces, never edits in place.
    """

    def __init__(self, run_dir: Path):
        import queue
        import threading

        self.run_dir = run_dir
        self.seconds = 0.0  # time the thread spent writing (overlapped with the loop)
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._written: tuple[int, ...] | None = None
        self._thread = threading.Thread(target=self._work, name="cliptune-run-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure nothing later is written (order is kept)
                    t0 = time.perf_counter()
                    job()
                    self.seconds += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001  (any failure is handed to the loop's thread)
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def checkpoint(self, state: dict) -> None:
        snap = {**state, "fitness": list(state["fitness"]), "digests": list(state["digests"]),
                "evals": list(state["evals"])}

        def job():
            self._written = save_checkpoint(self.run_dir, snap, self._written)

        self._check()
        self._q.put(job)

    def history(self, entry: dict) -> None:
        line = _history_line(entry)
        self._check()
        self._q.put(lambda: append_line(self.run_dir / "history.jsonl", line))

    def close(self, quiet: bool = False) -> None:
        """Wait until everything handed over is on disk, stop the thread; raise its error unless ``quiet``."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if not quiet:
            self._check()


def _read_checkpoint(path: Path) -> dict | None:
    """The state in ``path``, or None when it is unreadable, truncated, not a checkpoint or fails its checksum."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: UnicodeDecodeError, JSONDecodeError
        return None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or state.get("checksum") != _checksum(state):
        return None
    return state


def load_checkpoint(run_dir: Path) -> dict | None:
    """The newest valid checkpoint, or None when the run dir has none.

    A corrupt or truncated checkpoint.json falls back to checkpoint.prev.json with a warning; when no
    valid checkpoint is left, or one is from a newer cliptune-ort, CheckpointError (never a silent restart).
    """
    cur, prev = run_dir / CKPT, run_dir / CKPT_PREV
    state, path = None, None
    if cur.exists():
        state, path = _read_checkpoint(cur), cur
        if state is None:
            if prev.exists():
                state, path = _read_checkpoint(prev), prev
            if state is None:
                raise CheckpointError(f"{cur} is corrupt or truncated (checksum or JSON check failed) and no valid "
                                      f"{CKPT_PREV} is left: expected a checkpoint written by `cliptune tune`; start "
                                      "over with --overwrite")
            warnings.warn(f"{cur} is corrupt or truncated (checksum or JSON check failed); resuming from {prev.name} "
                          f"(generation {state.get('generation')})", RuntimeWarning, stacklevel=2)
    elif prev.exists():
        state, path = _read_checkpoint(prev), prev
        if state is None:
            raise CheckpointError(f"{prev} is corrupt or truncated and there is no {CKPT}: expected a checkpoint "
                                  "written by `cliptune tune`; start over with --overwrite")
    if state is not None and state.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}, this cliptune-ort reads "
                              f"version {CKPT_VERSION}: resume with the cliptune-ort that wrote it, or start over "
                              "with --overwrite")
    return state


def _save_array(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- the run


class _Interrupt:
    """SIGINT or SIGTERM: finish the current generation, write a checkpoint, exit (the CLI prints how to
    resume and exits 130). A second signal stops at once (KeyboardInterrupt; the last checkpoint stays)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.hit = False
        self.signal_name: str | None = None
        self._old: dict = {}

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread, or the platform refuses
                pass
        return self

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.hit:
            raise KeyboardInterrupt(f"second {name}")
        self.hit = True
        self.signal_name = name
        print(f"\n[cliptune] {name}: finishing this generation and writing a checkpoint "
              f"({'Ctrl-C' if name == 'SIGINT' else name} again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


class RunInterrupted(Exception):
    """Raised after a SIGINT checkpoint; the CLI exits 130 with the resume command."""


def versions() -> dict[str, str]:
    import onnxruntime

    from .optim import import_cma

    cma = import_cma()

    return {"cliptune_ort": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "cma": cma.__version__, "platform": platform.platform()}


#: every file a run writes into its run dir (what --overwrite deletes; nothing else is touched)
RUN_FILES = ("config.json", "history.jsonl", CKPT, CKPT_PREV, "best_z.npy", "best_prompt.npy", "result.json",
             "convergence.png", "nan_candidate.json")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber a run or to use something that is not a folder; True when ``run_dir`` holds a run.

    Nothing is deleted here: on --overwrite, tune() deletes the old run's files only once every input of
    the new run has been checked, so a bad input never costs the old run.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pass --resume to continue the run in "
                          "--out, or --overwrite to delete it and start over")
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} is a file, expected a folder: pass another --out")
    has_run = any((run_dir / f).exists() for f in (CKPT, CKPT_PREV, "result.json", "config.json"))
    if has_run and not resume and not overwrite:
        raise ConfigError(f"run dir {run_dir} already holds a run: pass --resume to continue it, "
                          "--overwrite to start over, or another --out")
    return has_run


def _lock_run_dir(run_dir: Path) -> int:
    """An exclusive advisory lock on ``run_dir/.lock``: two processes never run one run dir at once."""
    import fcntl

    fd = os.open(run_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"run dir {run_dir} is in use by another cliptune process: wait for it to finish, "
                          "or use another --out") from None
    return fd


def tune(cfg: TuneConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
         force_resume: bool = False, progress: bool = True, model_dir: Path | None = None,
         stop_after_generations: int | None = None) -> dict[str, Any]:
    """Run (or resume) one tuning run in ``run_dir``; returns the result dict (also result.json).

    The run dir is locked (``.lock``, flock) while this call works in it; the run's sessions are closed
    when it returns (or fails), so runs one after another in one process do not pile up device memory.
    """
    locks: list[int] = []
    engines: list[Engine] = []
    optimizers: list = []
    try:
        with blas_threads():
            return _tune(cfg, run_dir, resume, overwrite, force_resume, progress, model_dir, stop_after_generations,
                         locks, engines, optimizers)
    finally:
        for opt in optimizers:
            opt.close()
        for eng in engines:
            eng.close()
        for fd in locks:
            os.close(fd)


@contextlib.contextmanager
def blas_threads():
    """numpy's BLAS (CMA-ES's eigendecomposition, the projection) on one thread for the run, as the CLI
    sets it (OPENBLAS_NUM_THREADS=1) before numpy loads; an OPENBLAS_NUM_THREADS / OMP_NUM_THREADS the
    user set wins. Its idle threads otherwise spin against ONNX Runtime's workers: a bbt SST-2 cell of
    the accuracy sweep (API calls, two BLAS threads on 2 cores) spent 228 s of its 398 s in CMA-ES
    ask/tell, against 2.6 s of 32 s with one thread (benchmarks/results/tune_time.md)."""
    if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a declared dependency; without it numpy keeps its default
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def blas_thread_count() -> int | None:
    """Threads numpy's BLAS uses now (None when threadpoolctl is missing or finds no BLAS)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def eigen_mode(cfg: TuneConfig, provider: str, state: dict | None) -> str | None:
    """CMA-ES's eigendecomposition schedule for this run (cfg.cma_eigen): a resume keeps the one its
    checkpoint records (``sync`` for checkpoints written before the setting existed), since the
    optimiser's replay must make the same candidates (None: a random-search run's); a new run resolves
    ``auto`` by provider."""
    if state is not None:
        kept = state.get("cma_eigen", "sync")
        if kept is not None and cfg.cma_eigen not in ("auto", kept):
            warnings.warn(f"cma_eigen {cfg.cma_eigen} asked for, but the run resumed here was started with "
                          f"{kept}: it continues with {kept} (a resume replays the optimiser as it ran)",
                          RuntimeWarning, stacklevel=3)
        return kept
    if cfg.cma_eigen != "auto":
        return cfg.cma_eigen
    return "ahead" if provider == "CUDAExecutionProvider" else "sync"


def _tune(cfg: TuneConfig, run_dir: str | Path, resume: bool, overwrite: bool, force_resume: bool, progress: bool,
          model_dir: Path | None, stop_after_generations: int | None, locks: list[int],
          engines: list[Engine], optimizers: list) -> dict[str, Any]:
    """Run (or resume) one tuning run in ``run_dir``; returns the result dict (also result.json).

    Every input is checked before anything is written; a run dir this call creates is removed again if
    it fails before its loop starts. A resume refuses other settings or another model export unless
    ``force_resume``.
    """
    import shutil

    from .errors import DataError
    from .fileio import remove_stale_temps

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    had_run = check_run_dir(run_dir, resume, overwrite)
    new_key = cfg.run_key()

    def refuse_other_settings(old: dict | None, where: str) -> None:
        if force_resume or not isinstance(old, dict):
            return
        diff = [k for k in new_key if old.get(k) != new_key[k]]
        if diff:
            shown = "; ".join(f"{k} {old.get(k)!r:.40}, now {new_key[k]!r:.40}" for k in diff[:6])
            more = "; ..." if len(diff) > 6 else ""
            raise CheckpointError(f"run dir {run_dir} was started with other settings ({shown}{more}) per its "
                                  f"{where}: resume with the same settings (see {run_dir / 'config.json'}), or pass "
                                  "--force-resume to continue anyway")

    def read_json(path: Path) -> dict | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    if resume and had_run:
        refuse_other_settings(read_json(run_dir / "config.json"), "config.json")
        if (run_dir / "result.json").exists():
            done = read_json(run_dir / "result.json")
            if done is not None:
                return done
            warnings.warn(f"{run_dir / 'result.json'} is corrupt or truncated: finishing the run again from its "
                          "last checkpoint", RuntimeWarning, stacklevel=2)
    if cfg.data_source == "hub":
        from .data import hub_unreachable

        why = hub_unreachable()
        if why:
            raise DataError(f"--data-source hub: the Hugging Face hub is not reachable ({why}): check the network, "
                            "set HF_HUB_OFFLINE=1 to use datasets already in the local cache, or use the vendored "
                            "data (--data-source local)")
    ws = prepare(cfg, model_dir)
    engines.append(ws.engine)  # closed by tune() however this call ends
    fingerprint = ws.manifest.fingerprint()
    state = None
    if resume and had_run:
        state = load_checkpoint(run_dir)
        if state is not None:
            refuse_other_settings(state.get("run_key"), CKPT)
            if state.get("model") != fingerprint and not force_resume:
                was = (state.get("model") or {}).get("export_id")
                raise CheckpointError(f"run dir {run_dir} was started on another model export (export {was}, now "
                                      f"{fingerprint['export_id']}): pass the same --model-dir, or --force-resume to "
                                      "continue anyway")
    if had_run and overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    if run_dir.exists():
        remove_stale_temps(run_dir)
    elif resume:
        print(f"[cliptune] {run_dir} holds no run yet: starting a new one", file=sys.stderr, flush=True)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        locks.append(_lock_run_dir(run_dir))
        # new_key adds a task file's sha256 to the settings (what a resume compares with)
        atomic_write_json(run_dir / "config.json", {**cfg.to_dict(), **new_key,
                                                    "resolved_model_dir": str(ws.manifest.root.resolve()),
                                                    "loss_used": ws.loss})

        timing = {"ask_tell": 0.0, "projection": 0.0, "scoring": 0.0, "eval": 0.0}
        if cfg.method == "manual":
            result = _finish(ws, run_dir, None, None, [], 0, 0, timing, t_start, None)
            return result

        t_opt = time.perf_counter()
        eigen = eigen_mode(cfg, ws.engine.provider, state)
        opt = make_optimizer(cfg.optimizer, cfg.d, cfg.popsize, cfg.sigma0, cfg.seed, eigen)
        optimizers.append(opt)
        if state is None:
            state = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "run_key": new_key, "model": fingerprint,
                     "generation": 0, "calls": 0, "forward_passes": 0, "elapsed": 0.0, "fitness": [], "digests": [],
                     "best_fit": None, "best_z": None, "best_dev": None, "best_dev_z": None, "best_dev_calls": None,
                     "evals": [], "next_eval": cfg.eval_every}
            atomic_write_text(run_dir / "history.jsonl", "")
        else:
            opt.replay(state["fitness"], state["digests"])
            atomic_write_text(run_dir / "history.jsonl", "".join(_history_line(e) + "\n" for e in state["evals"]))
            print(f"[cliptune] resumed {run_dir} at generation {state['generation']} ({state['calls']} calls)",
                  file=sys.stderr, flush=True)
        state.setdefault("cma_eigen", opt.eigen)  # what runs (sync where the sampler cannot run ahead)
        ws.setup_seconds["optimizer"] = round(time.perf_counter() - t_opt, 4)  # made (and a resume's replay)
    except BaseException:
        if created:  # nothing of a run was made: leave no half-made run dir behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    elapsed0 = float(state["elapsed"])
    t_loop = time.perf_counter()
    timing["setup"] = t_loop - t_start  # sessions, data, projection (and a resume's replay)
    timing["checkpoint"] = 0.0

    def used() -> int:
        return state["calls"] if cfg.budget_unit == "calls" else state["forward_passes"]

    bar = _progress(cfg.budget, used(), progress)
    writer = _RunWriter(run_dir)
    memo: dict = {}  # the last dev evaluation, reused while the best candidate is unchanged
    try:
        early = _loop(cfg, ws, opt, state, run_dir, fingerprint, timing, bar, writer, memo, used, elapsed0, t_loop,
                      stop_after_generations)
    except BaseException:
        writer.close(quiet=True)  # what was handed over still lands; the error in flight wins
        raise
    writer.close()
    timing["checkpoint_background"] = writer.seconds
    if isinstance(early, dict):
        return early
    bar.close()
    state["elapsed"] = elapsed0 + time.perf_counter() - t_loop
    return _finish(ws, run_dir, state, early, state["evals"], state["calls"], state["forward_passes"],
                   timing, t_start, elapsed0)


#: the next generation's ask runs on its own thread during the dev evaluation and checkpoint hand-over (_loop)
ASK_AHEAD = True


def _loop(cfg: TuneConfig, ws: Workspace, opt, state: dict, run_dir: Path, fingerprint: dict, timing: dict, bar,
          writer: _RunWriter, memo: dict, used, elapsed0: float, t_loop: float,
          stop_after_generations: int | None) -> str | dict | None:
    """The generations: returns the optimiser's stop reason (None: budget spent), or the
    ``stop_after_generations`` summary; raises RunInterrupted after a SIGINT checkpoint."""
    stop_reason = None
    gens_this_process = 0
    # the next generation's ask runs on a thread of its own while this one evaluates on dev and hands over the
    # checkpoint: pycma's eigendecomposition (most of its ask/tell) falls due every 5 generations at d = 500 and
    # pop 20, the same generations as the dev evaluation at the default eval_every of 100 calls
    asker = ThreadPoolExecutor(1, thread_name_prefix="cliptune-ask")
    timing.setdefault("ask_background", 0.0)

    def timed_ask():
        ta = time.perf_counter()
        out = opt.ask()
        return out, time.perf_counter() - ta

    ahead = None  # the next generation's ask, running
    patience_hit = patience_stop(cfg, state)  # a resumed run that had already stopped early stays stopped
    if patience_hit:
        return patience_hit
    with _Interrupt() as intr, contextlib.ExitStack() as stack:
        stack.callback(asker.shutdown, wait=True)
        while used() < cfg.budget:
            t0 = time.perf_counter()
            if ahead is not None:
                z, ta = ahead.result()
                timing["ask_background"] += ta
                ahead = None
            else:
                z = opt.ask()
            t1 = time.perf_counter()
            prompts = ws.prompts(z)
            t2 = time.perf_counter()
            fp0 = ws.engine.forward_passes
            fit = score(ws, prompts)
            t3 = time.perf_counter()
            if not np.all(np.isfinite(fit)):  # never tell CMA-ES a NaN/inf: stop, keep the evidence
                bad = int(np.flatnonzero(~np.isfinite(fit))[0])
                atomic_write_json(run_dir / "nan_candidate.json", {
                    "generation": state["generation"], "calls": state["calls"], "index": bad,
                    "fitness": repr(float(fit[bad])), "all_fitness": [repr(float(f)) for f in fit],
                    "z": [float(v) for v in z[bad]], "run_key": cfg.run_key(), "model": fingerprint})
                raise NumericError(f"expected a finite loss, found {float(fit[bad])} for candidate {bad} of generation "
                                   f"{state['generation']} (its z is saved in {run_dir / 'nan_candidate.json'}; the "
                                   "last checkpoint is kept): lower --sigma0 or check the model dir")
            opt.tell(z, fit)
            t4 = time.perf_counter()
            timing["ask_tell"] += (t1 - t0) + (t4 - t3)
            timing["projection"] += t2 - t1
            timing["scoring"] += t3 - t2
            state["fitness"].append([float(f) for f in fit])
            state["digests"].append(digest(z))
            state["generation"] += 1
            state["calls"] += len(fit)
            state["forward_passes"] += ws.engine.forward_passes - fp0
            i = int(np.argmin(fit))
            if state["best_fit"] is None or fit[i] < state["best_fit"]:
                state["best_fit"] = float(fit[i])
                state["best_z"] = [float(v) for v in z[i]]
            gens_this_process += 1
            reason = opt.stop_reason()  # before the next ask starts: both read the optimiser's state
            last = used() >= cfg.budget or reason is not None
            stop_early = stop_after_generations is not None and gens_this_process >= stop_after_generations
            if ASK_AHEAD and not (last or stop_early or intr.hit):
                ahead = asker.submit(timed_ask)  # only the optimiser's thread touches it until result()
            while state["calls"] >= state["next_eval"] or used() >= cfg.budget:
                te = time.perf_counter()
                _dev_eval(ws, state, writer, memo)
                timing["eval"] += time.perf_counter() - te
                state["next_eval"] += cfg.eval_every
                if used() >= cfg.budget:
                    break
            patience_hit = patience_stop(cfg, state)
            bar.update(used(), state)
            if last or state["generation"] % cfg.checkpoint_every == 0 or intr.hit or stop_early or patience_hit:
                tc = time.perf_counter()
                state["elapsed"] = elapsed0 + tc - t_loop
                writer.checkpoint(state)
                timing["checkpoint"] += time.perf_counter() - tc
            if reason is not None:
                stop_reason = f"optimizer stopped: {reason}"
                break
            if patience_hit:  # an ask running ahead is dropped: nothing follows it
                stop_reason = patience_hit
                break
            if intr.hit:
                bar.close()
                writer.close()  # the checkpoint is on disk before the run says so
                raise RunInterrupted(f"interrupted at generation {state['generation']} ({state['calls']} calls); "
                                     f"checkpoint written. Resume with: cliptune tune --resume --out {run_dir} "
                                     "(same settings)")
            if stop_early:
                bar.close()
                return {"stopped_after_generations": gens_this_process, "generation": state["generation"]}
    return stop_reason


def patience_stop(cfg: TuneConfig, state: dict) -> str | None:
    """The stop reason once ``cfg.patience`` dev evaluations in a row found no better dev metric (from the
    evaluations the state records, so a resume sees the same), else None."""
    if cfg.patience <= 0 or len(state["evals"]) < cfg.patience:
        return None
    if any(e["improved"] for e in state["evals"][-cfg.patience:]):
        return None
    return (f"patience: no better dev metric in {cfg.patience} evaluations (best {state['best_dev']} at "
            f"{state['best_dev_calls']} calls)")


def _dev_eval(ws: Workspace, state: dict, writer: _RunWriter, memo: dict) -> None:
    """Score the best candidate so far on dev with the full network; keep it if it is the best. The same
    candidate as at the last evaluation (no better one since) gets the same numbers: they are reused.

    Its prompt is made where the generation's were (``ws.prompts``): on the device for a bound CUDA run.
    On the host, z @ A reads the whole projection (500 x 51,200 float32 for roberta-large, 102 MB: 5 ms
    on the 2-core machine) and the prompt then crosses to the device; run 9's 80 dev evaluations took
    0.91 s where one candidate's call takes 3.3 ms."""
    if memo.get("z") is not state["best_z"]:
        z = np.asarray(state["best_z"], dtype=np.float64)[None]
        memo["r"] = evaluate(ws, ws.prompts(z), ws.dev)
        memo["z"] = state["best_z"]
    r = memo["r"]
    improved = state["best_dev"] is None or r["metric"] > state["best_dev"]
    if improved:
        state["best_dev"] = r["metric"]
        state["best_dev_z"] = state["best_z"]
        state["best_dev_calls"] = state["calls"]
    entry = {"calls": state["calls"], "forward_passes": state["forward_passes"], "generation": state["generation"],
             "best_train_fitness": state["best_fit"], "dev_metric": r["metric"], "dev_loss": r["loss"],
             "best_dev_metric": state["best_dev"], "improved": improved}
    state["evals"].append(entry)
    writer.history(entry)


def _finish(ws: Workspace, run_dir: Path, state: dict | None, stop_reason: str | None, evals: list, calls: int,
            passes: int, timing: dict, t_start: float, elapsed0: float | None) -> dict[str, Any]:
    """Test once with the best-dev prompt; write best_z/best_prompt, result.json and the plot."""
    cfg = ws.cfg
    te = time.perf_counter()
    if state is not None:
        z = np.asarray(state["best_dev_z"], dtype=np.float64)
        prompt = ws.prompts(z, host=True)[0]
        _save_array(run_dir / "best_z.npy", z)
        _save_array(run_dir / "best_prompt.npy", prompt)
        # evaluated as the dev evaluations that chose it were (_dev_eval): made on the device for a bound CUDA
        # run, whose dev binding (captured) then serves again; the host prompt's bindings would be new, and
        # each new binding's first run seems to cost tens of ms: run 9's final evaluation took 0.41 s over six
        # new bindings for an estimated 76 ms of kernels. Unbound (CPU) runs evaluate the same host prompt.
        evaluated = ws.prompts(z[None]) if ws.engine.projects_on_device(1) else prompt
    else:
        prompt = evaluated = None
    train = evaluate(ws, evaluated, ws.train)
    dev = evaluate(ws, evaluated, ws.dev)
    test = evaluate(ws, evaluated, ws.test) if ws.test is not None else None
    timing["final_eval"] = time.perf_counter() - te
    wall = time.perf_counter() - t_start + (elapsed0 or 0.0)
    timing["session_run_seconds"] = ws.engine.session_seconds
    result = {
        "task": ws.task.name, "task_file": ws.task.source_file, "method": cfg.method, "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "k": cfg.k if cfg.method == "clip" else 0, "mixture": cfg.mixture if cfg.method == "clip" else None,
        "p": ws.manifest.data["p"] if cfg.method == "clip" else None, "loss": ws.loss, "metric": ws.task.metric,
        "train": train, "dev": {**dev, "best_at_calls": state["best_dev_calls"] if state else None},
        "test": test, "test_note": None if test is not None else ws.fewshot.info.get("test_note", "no test split"),
        "calls": calls, "forward_passes": passes, "generations": state["generation"] if state else 0,
        "budget": cfg.budget, "budget_unit": cfg.budget_unit, "stop_reason": stop_reason,
        "best_train_fitness": state["best_fit"] if state else None,
        "wall_seconds": round(wall, 3), "timing_seconds": {k: round(v, 4) for k, v in timing.items()},
        "setup_seconds": ws.setup_seconds,  # this process's prepare(), by phase (part of timing's setup)
        "session_open_seconds": {str(g): v for g, v in ws.engine.open_seconds.items()},
        "session_open_wall_seconds": ws.engine.open_wall_seconds,  # all of them (opened at once, beside the data)
        "provider": ws.engine.provider, "cands_per_call": ws.engine.cands_per_call,
        # prompts made by the projection graph on the engine's device, bound to the graphs' input
        "projection_on_device": ws.at is not None and ws.engine.projects_on_device(cfg.popsize),
        "blas_threads": blas_thread_count(),
        "cma_eigen": state.get("cma_eigen") if state else None,  # CMA-ES's eigendecomposition schedule (cfg.cma_eigen)
        # packed-attention graphs compute no padded token (up to the last layer) and take one bucket
        "train_padded_fraction": 0.0 if ws.manifest.packed else round(ws.train.padded_fraction, 4),
        "n_buckets": 1 if ws.manifest.packed else cfg.n_buckets, "train_parts": len(ws.train.parts),
        "attention": ws.manifest.data.get("attention", "padded"),
        "attention_kernel": ws.engine.attention,  # ONNX Runtime's attention kernel on CUDA ('auto': its choice)
        "model_dir": str(ws.manifest.root.resolve()), "model_source": ws.manifest.data["model"]["source"],
        "export_id": ws.manifest.data["export_id"], "fewshot": ws.fewshot.info,
        "versions": versions(),
    }
    atomic_write_json(run_dir / "result.json", result)
    if cfg.plot and evals:
        try:
            plot_convergence(evals, run_dir / "convergence.png", f"{ws.task.name} {cfg.method} seed {cfg.seed}")
        except ImportError:
            warnings.warn("matplotlib is not installed: no convergence.png", RuntimeWarning, stacklevel=2)
    return result


def plot_convergence(evals: list[dict], path: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = [e["calls"] for e in evals]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax1.plot(calls, [e["dev_metric"] for e in evals], label="dev metric (best-so-far candidate)", color="C0")
    ax1.plot(calls, [e["best_dev_metric"] for e in evals], label="best dev metric", color="C0", linestyle="--")
    ax1.set_xlabel("calls")
    ax1.set_ylabel("dev metric")
    ax2 = ax1.twinx()
    ax2.plot(calls, [e["best_train_fitness"] for e in evals], label="best train fitness", color="C1")
    ax2.set_ylabel("train fitness (loss)")
    ax1.set_title(title)
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="center right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


class _progress:
    """A progress bar on stderr (tqdm when the terminal is interactive)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="call", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None
        self.enabled = enabled
        self.last = start
        self.total = total
        self._t = time.perf_counter()

    def update(self, used: int, state: dict) -> None:
        if self.bar is not None:
            self.bar.update(used - self.last)
            self.bar.set_postfix(loss=f"{state['best_fit']:.4f}",
                                 dev=f"{state['best_dev']:.3f}" if state["best_dev"] is not None else "-")
        elif self.enabled and (time.perf_counter() - self._t > 10 or used >= self.total):
            self._t = time.perf_counter()
            dev = f"{state['best_dev']:.3f}" if state["best_dev"] is not None else "-"
            print(f"[cliptune] {used}/{self.total} best train loss {state['best_fit']:.4f} best dev {dev}",
                  file=sys.stderr, flush=True)
        self.last = used

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
