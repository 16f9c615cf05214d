"""Every tuning default in one place, with a comment, and the checks on user values.

A :class:`TuneConfig` is built from defaults, then a JSON config file (``--config``), then CLI
flags; :func:`validate` turns every bad value into a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tasks import is_task_file, task_file_sha256

METHODS = ("clip", "bbt", "manual")
OPTIMIZERS = ("cma", "random")
CMA_EIGEN = ("auto", "sync", "ahead")  # TuneConfig.cma_eigen
MIXTURES = ("mean_loss", "mean_logits", "assign")
BUDGET_UNITS = ("calls", "forward")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TuneConfig:
    task: str = "sst2"  # task name from the task table (cliptune_ort.tasks), or a task file's path (*.json)
    method: str = "clip"  # clip: K thinned nets | bbt: full network only | manual: no soft prompt
    optimizer: str = "cma"  # cma (CMA-ES, the `cma` package) | random (Gaussian local random search)
    # when CMA-ES's eigendecomposition runs: sync (pycma's schedule, in the ask where it falls due) | ahead (on a
    # worker thread while the generation is scored, in use one generation later) | auto (ahead on CUDA, where the
    # host's cores wait on the GPU; sync on the CPU provider). Measured: benchmarks/results/cma_eigen.json
    cma_eigen: str = "auto"
    seed: int = 42  # few-shot sample, projection A, optimiser
    model_dir: str | None = None  # exported model dir; None = the embedded splade-tiny (exported on demand)
    data_dir: str | None = None  # data folder; None = the vendored data
    data_source: str = "local"  # local (JSONL files) | hub (datasets.load_dataset, needs network)
    per_class: int = 16  # few-shot examples per class in train and in dev
    k: int = 4  # thinned networks scored per candidate (clip); must be <= the export's K
    p: float = 0.1  # dropout rate of the embedded default's export (only used to pick/export it)
    precision: str = "fp32"  # of the embedded default's export: fp32 | int8 (CPU edge mode) | fp16 (CUDA)
    mixture: str = "mean_loss"  # how the K rewards combine: mean_loss | mean_logits | assign
    loss: str | None = None  # ce | hinge; None = the task's default (hinge for mrpc, snli, rte)
    margin: float = 2.0  # hinge margin (BBT)
    d: int = 500  # intrinsic dimension of z
    popsize: int = 20  # candidates per generation
    sigma0: float = 1.0  # CMA-ES initial step size (also scales the projection A)
    budget: int = 8000  # stop after this many calls (or forward passes, see budget_unit)
    budget_unit: str = "calls"  # calls: one candidate on the train set | forward: one pass through one graph
    eval_every: int = 100  # calls between dev evaluations of the best candidate so far
    # early stop: end the run once this many dev evaluations in a row found no better dev metric (0 = off: the
    # whole budget, as BBT and Clip-Tuning run)
    patience: int = 0
    checkpoint_every: int = 10  # generations between checkpoints
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    # candidates stacked per session run; 0 = 1 on CPU, all on CUDA. Measured (benchmarks/results/tune_time_sweep.json:
    # 2 cores, splade-tiny SST-2, clip K=4, 2,000 calls): 1 -> 36.9 s, 2 -> 38.2 s (same FLOPs, bigger activations)
    cands_per_call: int = 0
    iobinding: str = "auto"  # auto (on for CUDA) | on | off: IOBinding, fixed inputs kept on the device
    cuda_graph: bool = False  # capture CUDA graphs (device cuda only)
    # length buckets of the fixed train set, each padded to its own longest (1 = BBT: one padded batch). Measured
    # (same sweep): SST-2 padding 27.7% / 13.8% / 6.2% / 1.8% and 60.9 / 41.6 / 36.9 / 36.6 s for 1 / 2 / 4 / 8
    # buckets: 8 saves as much padding as it adds session-run overhead; 4
    n_buckets: int = 4
    eval_chunk: int = 256  # dev/test examples per session run (bounds memory)
    threads: int = 0  # ORT intra-op threads per session; 0 = 1 when workers > 1, else the number of cores
    # parallel session runs on the CPU; 0 = one per core (each single-threaded). Measured (same sweep): 2 workers x 1
    # thread 36.9 s vs 1 worker x 2 threads 50.6 s (these small GEMMs scale badly over threads)
    workers: int = 0
    max_len: int = 0  # token limit per example; 0 = the model's limit
    template: str | None = None  # override the task's template (must hold <P>, [MASK] and {text})
    verbalizer: str | None = None  # override the task's verbalizer: comma-separated words in label order
    verbalizer_policy: str = "error"  # error: a multi-token verbalizer word is refused | first: first sub-token
    plot: bool = True  # write convergence.png (matplotlib)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def run_key(self) -> dict[str, Any]:
        """The values that define a run's results (a resume must match them).

        ``model_dir`` is left out: a path says nothing about the model (a model dir may be copied to
        another machine); a resume compares the export's fingerprint (export id and sha256s) instead.
        """
        d = self.to_dict()
        if is_task_file(self.task):  # a task file's content defines the run, not only its path
            d["task_file_sha256"] = task_file_sha256(self.task)
        # cma_eigen is left out too: a resume continues with the schedule its checkpoint records (tuner.eigen_mode)
        for k in ("device", "threads", "workers", "checkpoint_every", "plot", "eval_chunk", "iobinding",
                  "cuda_graph", "model_dir", "cma_eigen"):
            d.pop(k)
        return d


_FIELDS = {f.name: f for f in fields(TuneConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Convert ``value`` to the field's type; one-line error when it cannot be."""
    default = getattr(TuneConfig, name, None)
    typ = type(default) if default is not None else str
    if name in ("model_dir", "data_dir", "loss", "template"):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r:.80}")
        if name in ("model_dir", "data_dir") and value is not None and ("\0" in value or not value.strip()):
            raise ConfigError(f"{name} must be a folder path, got {value!r:.80}: pass the path of an existing folder")
        return value
    if name == "verbalizer":
        if isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value):
            value = ",".join(value)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"verbalizer must be comma-separated words or a list of strings, got {value!r:.80}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r:.80}")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name} must be an integer, got {value!r:.80}")
        try:
            v = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name} must be an integer, got {value!r:.80}") from None
        if not -2**63 <= v < 2**63:
            raise ConfigError(f"{name} must be an integer below 2**63 in size, got a {v.bit_length()}-bit number")
        return v
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r:.80}")
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name} must be a number, got {value!r:.80}") from None
        return v
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r:.80}")
    if name == "task" and is_task_file(value):  # a task file: kept as an absolute path (a run dir may be used elsewhere)
        if "\0" in value:
            raise ConfigError(f"task must be a task name or a task file's path, got {value!r:.80}")
        return str(Path(value).expanduser().resolve())
    return value


#: pycma (4.x) adapts sigma by two-point adaptation (TPA) from this dimension on (cma.evolution_strategy.TPA_dimension)
CMA_TPA_DIMENSION = 300


def build_config(file: str | Path | None = None, **overrides: Any) -> TuneConfig:
    """Defaults <- JSON config file <- overrides (None values are ignored); validated."""
    values: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist: pass an existing JSON file to --config") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder: pass a JSON file to --config") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror}): check its permissions") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                              f"offset {e.start}): save it as UTF-8 JSON") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"config file {path} is not valid JSON ({' '.join(str(e).split())[:120]}): "
                              "fix the file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of settings, got {type(raw).__name__}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)[:200]}: expected names from "
                          f"{', '.join(sorted(_FIELDS))}")
    cfg = TuneConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}, got {value!r:.80}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r:.80}")


def validate(cfg: TuneConfig) -> None:
    """Raise ConfigError (one line) for any value out of its domain."""
    from .errors import TaskError
    from .tasks import get_task

    try:
        get_task(cfg.task)
    except TaskError as e:
        raise ConfigError(str(e)) from None
    if is_task_file(cfg.task) and cfg.data_dir is not None:
        raise ConfigError(f"data_dir does not apply to task file {cfg.task}: its data paths are relative to the "
                          "file's folder; drop --data-dir")
    _choice("method", cfg.method, METHODS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("cma_eigen", cfg.cma_eigen, CMA_EIGEN)
    _choice("mixture", cfg.mixture, MIXTURES)
    _choice("budget_unit", cfg.budget_unit, BUDGET_UNITS)
    _choice("device", cfg.device, DEVICES)
    _choice("data_source", cfg.data_source, ("local", "hub"))
    _choice("iobinding", cfg.iobinding, ("auto", "on", "off"))
    _choice("precision", cfg.precision, ("fp32", "int8", "fp16"))
    _choice("verbalizer_policy", cfg.verbalizer_policy, ("error", "first"))
    if cfg.loss is not None:
        _choice("loss", cfg.loss, ("ce", "hinge"))
    for name in ("per_class", "d", "popsize", "budget", "eval_every", "checkpoint_every", "n_buckets", "eval_chunk"):
        _positive(name, getattr(cfg, name))
    for name in ("cands_per_call", "threads", "workers", "max_len", "seed", "patience"):
        _positive(name, getattr(cfg, name), allow_zero=True)
    if cfg.method == "clip":
        _positive("k", cfg.k)
    _positive("sigma0", cfg.sigma0)
    _positive("margin", cfg.margin, allow_zero=True)
    if not (0.0 < cfg.p < 1.0):
        raise ConfigError(f"p must be in (0, 1), got {cfg.p!r}")
    if cfg.popsize < 2:
        raise ConfigError(f"popsize must be >= 2 (CMA-ES needs a population), got {cfg.popsize}")
    if cfg.optimizer == "cma" and cfg.popsize < 3 and cfg.d >= CMA_TPA_DIMENSION:
        # pycma adapts its step size by two-point adaptation from d = 300 on, which spends two candidates of every
        # generation on its own probe directions (and mirrored sampling one more below pop 6): pop 2 fails in tell
        raise ConfigError(f"popsize 2 is too small for CMA-ES at d = {cfg.d} (from d = {CMA_TPA_DIMENSION} on, pycma's "
                          "step-size adaptation uses two candidates per generation): pass --popsize 3 or more "
                          f"(default 20), or --d below {CMA_TPA_DIMENSION}")
    if cfg.budget < cfg.popsize:
        raise ConfigError(f"budget ({cfg.budget}) must be at least one generation (popsize {cfg.popsize})")
    if cfg.seed >= 2**31:
        raise ConfigError(f"seed must be < 2**31, got {cfg.seed}")
