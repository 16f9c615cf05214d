"""The ``cliptune`` command: export | tune | bench | eval | predict | deploy | env.

Every deliberate error is a :class:`CliptuneError`: printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

# numpy's BLAS is only used for the small projection A z; its idle threads spin and steal the cores
# from ONNX Runtime's workers (measured: a 2,000-call clip run 37.3 s -> 33.7 s with one BLAS thread).
# Set before numpy is first imported; a user's own setting wins. (torch, in the export step, does not
# use OpenBLAS, so its threads are unaffected.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import CliptuneError, ConfigError
from .manifest import DEFAULT_INT8_WEIGHTS, INT8_WEIGHTS


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 2 and a one-line message (its default is a usage dump)."""

    def error(self, message: str):  # noqa: D401
        print(f"cliptune: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_tune_args(p: argparse.ArgumentParser) -> None:
    from .config import BUDGET_UNITS, CMA_EIGEN, METHODS, MIXTURES, OPTIMIZERS

    p.add_argument("--task", help="task name (default sst2): sst2, yelp_polarity, ag_news, dbpedia, mrpc, rte, snli; "
                                  "or your own task's file (*.json: template, verbalizer, train file; README, 'Your "
                                  "own task')")
    p.add_argument("--method", choices=METHODS, help="clip (default) | bbt | manual")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="cma (default) | random")
    p.add_argument("--cma-eigen", choices=CMA_EIGEN, help="when CMA-ES's eigendecomposition runs: sync (pycma's "
                   "schedule) | ahead (on a worker thread while a generation is scored, one generation behind) | "
                   "auto (default: ahead on CUDA, sync on CPU)")
    p.add_argument("--seed", type=int, help="seed of the few-shot split, projection and optimiser (default 42)")
    p.add_argument("--model-dir", help="exported model dir (default: the embedded splade-tiny, exported on demand)")
    p.add_argument("--data-dir", help="data folder (default: the vendored data)")
    p.add_argument("--data-source", choices=("local", "hub"), help="local JSONL (default) or the HF hub (online)")
    p.add_argument("--per-class", type=int, help="few-shot examples per label drawn for train and for dev each "
                                                 "(default 16, BBT's; a task file with a dev file uses its files whole)")
    p.add_argument("--k", type=int, help="thinned networks per candidate (default 4)")
    p.add_argument("--p", type=float, help="dropout rate of the embedded model's export (default 0.1)")
    p.add_argument("--precision", choices=("fp32", "int8", "fp16"),
                   help="precision of the embedded model's export (default fp32; int8 = CPU edge mode)")
    p.add_argument("--mixture", choices=MIXTURES, help="how K rewards combine (default mean_loss)")
    p.add_argument("--loss", choices=("ce", "hinge"), help="default: the task's (hinge for mrpc, snli, rte)")
    p.add_argument("--d", type=int, help="intrinsic dimension (default 500)")
    p.add_argument("--popsize", type=int, help="CMA-ES population (default 20)")
    p.add_argument("--sigma0", type=float, help="CMA-ES initial step size (default 1.0)")
    p.add_argument("--budget", type=int, help="budget (default 8000)")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS, help="calls (default) or forward passes")
    p.add_argument("--eval-every", type=int, help="calls between dev evaluations (default 100)")
    p.add_argument("--patience", type=int, help="stop once this many dev evaluations in a row find no better dev "
                                                "metric (default 0: off, the whole budget)")
    p.add_argument("--checkpoint-every", type=int, help="generations between checkpoints (default 10)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto (CUDA when present)")
    p.add_argument("--cands-per-call", type=int, help="candidates per session run (0 = 1 on CPU, all on CUDA)")
    p.add_argument("--iobinding", choices=("auto", "on", "off"), help="IOBinding (default auto: on for CUDA)")
    p.add_argument("--cuda-graph", action="store_true", default=None, help="capture CUDA graphs (device cuda)")
    p.add_argument("--n-buckets", type=int, help="length buckets of the train set (default 4; 1 = one padded batch)")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (0 = cores)")
    p.add_argument("--workers", type=int, help="parallel single-threaded session runs on CPU (0 = one per core)")
    p.add_argument("--max-len", type=int, help="token limit per example (0 = the model's)")
    p.add_argument("--template", help="override the task template (<P>, {text}, [MASK])")
    p.add_argument("--verbalizer", help="override the verbalizer: comma-separated words in label order")
    p.add_argument("--verbalizer-policy", choices=("error", "first"), help="multi-token verbalizer words")
    p.add_argument("--config", help="JSON file of settings (CLI flags override it)")


_TUNE_KEYS = ("task", "method", "optimizer", "cma_eigen", "seed", "model_dir", "data_dir", "data_source", "per_class", "k", "p", "precision", "mixture",
              "loss", "d", "popsize", "sigma0", "budget", "budget_unit", "eval_every", "patience", "checkpoint_every", "device",
              "cands_per_call", "iobinding", "cuda_graph", "n_buckets", "threads", "workers", "max_len", "template", "verbalizer", "verbalizer_policy")


def _tune_flags(a) -> dict:
    """The tune settings given on the command line (None where not given), for ``build_config``."""
    return {k: getattr(a, k) for k in _TUNE_KEYS}


def build_parser() -> argparse.ArgumentParser:
    from .manifest import PACKED_FRONTS, PACKED_KERNELS, PROMPT_DTYPES, Q_BIAS_PLACES

    ap = _Parser(prog="cliptune", description="Clip-Tuning on ONNX Runtime: derivative-free prompt learning")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    e = sub.add_parser("export", help="export a HF masked LM into K+1 ONNX graphs (needs the export extra)")
    e.add_argument("model", help="local Hugging Face masked-LM folder or hub id")
    e.add_argument("--out", required=True, help="output model dir")
    e.add_argument("--k", type=int, default=4, help="thinned graphs (default 4)")
    e.add_argument("--p", type=float, default=0.1, help="dropout rate of the masks (default 0.1)")
    e.add_argument("--seed", type=int, default=0, help="mask seed base: graph k uses seed + k (default 0)")
    e.add_argument("--n-prompt", type=int, default=50, help="prompt positions L (default 50)")
    e.add_argument("--random-init", action="store_true", help="random weights from config.json (benchmarks)")
    e.add_argument("--tokenizer", help="tokenizer folder/id when it differs from the model's")
    e.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="graph precision")
    e.add_argument("--int8-weights", choices=INT8_WEIGHTS, default=DEFAULT_INT8_WEIGHTS,
                   help="int8: the weights' format (default int7: no saturation on AVX2 CPUs without VNNI; int8 "
                        "is exact only with VNNI or on ARM)")
    e.add_argument("--atol", type=float, default=None, help="parity tolerance (default 1e-4 fp32, 2e-2 fp16)")
    e.add_argument("--fold-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="fold masks into weights (default: on for fp16, off otherwise)")
    e.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="project the first layer's Q/K/V of [CLS] + prompt once per candidate (default: on "
                        "for fp32/int8, off for fp16; with --packed host and --packed-kernel short_qkv or pipe_qkv, "
                        "the packing does it after ORT's fusions)")
    e.add_argument("--packed", nargs="?", const="device", choices=("device", "host"), default=False,
                   help="fp16 only: packed (padding-free) attention, CUDA provider only (one call, no padded "
                        "tokens); 'host': the runtime feeds the packing offsets, so CUDA graphs can capture it")
    e.add_argument("--packed-kernel", choices=PACKED_KERNELS, default=None,
                   help="with --packed: 'fused' = ORT's PackedAttention (QKV projection inside the op), 'flash' = "
                        "Q/K/V projections + PackedMultiHeadAttention without biases (FlashAttention varlen on "
                        "sm80+; the key bias dropped and the value bias folded, both exact), 'cudnn' = the same "
                        "projections + cliptune's RaggedAttention (cuDNN's fused attention on the packed rows, sm90; "
                        "`cliptune build-ops` with cuDNN's headers), 'short' = RaggedAttention with cliptune's own "
                        "kernel for rows of up to 128 tokens (sm80+; built where nvcc is found; a plain kernel beyond 128), "
                        "'short_qkv' = 'short' with one QKV projection read in place, 'pipe_qkv' = 'short_qkv' "
                        "pipelined (the next row and head loaded while one is computed; default: flash)")
    e.add_argument("--packed-ffn", choices=("matmul", "cublaslt", "cublaslt_res"), default="matmul",
                   help="with --packed: 'cublaslt' = the feed-forward bias + GELU (and the flash kernel's query "
                        "bias) inside the GEMM, cliptune's FusedDense op (cuBLASLt epilogue; tanh GELU); "
                        "'cublaslt_res' also adds each residual in the output projections' epilogue (then a plain "
                        "LayerNorm); the sessions need `cliptune build-ops` (default: matmul, ORT's own ops)")
    e.add_argument("--packed-front", choices=PACKED_FRONTS, default="gather",
                   help="with --packed host: 'fused' = the first packed layer's input (the embeddings plus each "
                        "candidate's prompt, real tokens only) made in one pass by cliptune's PackAdd op instead of "
                        "ORT's Add over the padded sum and a Gather (`cliptune build-ops`; default: gather)")
    e.add_argument("--packed-q-bias", choices=Q_BIAS_PLACES, default="projection",
                   help="with --packed and --packed-kernel short_qkv or pipe_qkv: 'attention' = the QKV projection "
                        "without a bias epilogue, RaggedAttention adding the query bias (default: projection)")
    e.add_argument("--prompt-dtype", choices=PROMPT_DTYPES, default="float32",
                   help="with --packed: the graphs' prompt_embeds type; 'float16' sends host prompts to the device in "
                        "half the bytes, cast on the host with the graph's own rounding (default: float32)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    t = sub.add_parser("tune", help="tune a soft prompt (default: SST-2 on the embedded model)")
    _add_tune_args(t)
    t.add_argument("--out", help="run dir (default runs/<task>_<method>_seed<seed>; with --seeds, the folder of the "
                                 "runs, default runs/<task>_<method>_seeds)")
    t.add_argument("--seeds", help="comma-separated seeds (e.g. 13,21,42,87,100): one run each in OUT/seed<s>, then "
                                   "OUT/summary.json with mean and std over the seeds")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--force-resume", action="store_true", help="resume even if settings or model differ")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    b = sub.add_parser("bench", help="time a tune's generations on this machine (p50/p90/p99, the projected run "
                                     "time) without tuning; same settings as tune")
    _add_tune_args(b)
    b.add_argument("--pops", default=None, help="population sizes to time, comma-separated (default: 1 and the "
                                                "run's popsize)")
    b.add_argument("--seconds", type=float, default=None, help="seconds of timed calls per part (default 3)")
    b.add_argument("--min-calls", type=int, default=None, help="timed calls per part, at least (default 10)")
    b.add_argument("--max-calls", type=int, default=None, help="timed calls per part, at most (default 1000)")
    b.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    b.add_argument("--out", help="result file, or a folder for the default name (default runs/bench_<task>_<method>_"
                                 "<device>.json; a .md beside it)")
    b.add_argument("--quiet", action="store_true", help="no progress lines")

    ts = sub.add_parser("tasks", help="list the built-in tasks; with task names or task files, check each as a run "
                                      "with these settings would see it (split, verbalizer tokens, lengths)")
    ts.add_argument("tasks", nargs="*", help="built-in task names or task files (*.json); none: list the built-ins")
    _add_tune_args(ts)

    v = sub.add_parser("eval", help="evaluate a run's best prompt on a split with the full network")
    v.add_argument("run_dir")
    v.add_argument("--split", choices=("train", "dev", "test"), default=None, help="default test")
    v.add_argument("--input", help="evaluate on this labelled file instead of a split (the task's data format: "
                                   ".jsonl / .csv / .tsv rows with text and label)")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)

    pr = sub.add_parser("predict", help="classify text with a tuned prompt (run dir or deployed .onnx)")
    pr.add_argument("run_dir", help="run dir, or a deployed classifier .onnx")
    pr.add_argument("--text", action="append", help="text to classify (repeatable)")
    pr.add_argument("--text-b", action="append", help="second text for pair tasks (repeatable)")
    pr.add_argument("--input", help="file of texts to classify: .txt (one per line), or .jsonl / .csv / .tsv rows "
                                    "with a text field (text_b for pairs; a task file's own column names); .gz too")
    pr.add_argument("--output", help="write the predictions here (JSON Lines, atomically) instead of stdout")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)

    dp = sub.add_parser("deploy", help="write a standalone classifier .onnx (+ .json sidecar) from a run (needs onnx)")
    dp.add_argument("run_dir", help="finished bbt/clip run dir")
    dp.add_argument("--out", required=True, help="classifier file, e.g. classifier.onnx (sidecar: classifier.json)")
    dp.add_argument("--int8", action="store_true", help="dynamic per-channel int8 weights (agreement is reported)")
    dp.add_argument("--int8-weights", choices=INT8_WEIGHTS, default=DEFAULT_INT8_WEIGHTS,
                    help="with --int8: the weights' format (as `cliptune export --int8-weights`; default int7)")
    dp.add_argument("--check-split", choices=("train", "dev", "test", "none"), default="dev",
                    help="split checked against the run's full graph (default dev)")
    dp.add_argument("--overwrite", action="store_true", help="replace an existing classifier and sidecar")
    dp.add_argument("--model-dir", help="build from this export (same weights) instead of the run's; needed for a "
                                        "run tuned on a --packed export")

    sub.add_parser("env", help="print versions and available ONNX Runtime providers")
    from .native import add_build_args

    add_build_args(sub.add_parser("build-ops", help="compile cliptune's custom-op library (for --packed-ffn "
                                                    "cublaslt exports; needs g++, CUDA and cuBLAS headers)"))
    return ap


def _task_name(cfg) -> str:
    """The task's name (a task file's ``name``, not its path) for default file names."""
    from .tasks import get_task

    return get_task(cfg.task).name


def _default_run_dir(cfg) -> Path:
    return Path("runs") / f"{_task_name(cfg)}_{cfg.method}_seed{cfg.seed}"


def _check_export_source(model: str, out: str, random_init: bool, tokenizer: str | None = None) -> None:
    """Refuse, before torch is even imported, what cannot be exported: a path that does not exist (it
    would be sent to the hub as an id), a folder whose config.json names a model without an MLM head
    (transformers would silently give it a random head) or that has no tokenizer files (transformers
    would silently make an empty one), an --out that is a file."""
    import os

    from .errors import ModelDirError

    tok_files = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
    local = Path(os.path.expanduser(model))
    looks_local = model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model
    if looks_local and not local.exists():
        raise ModelDirError(f"model folder {model} does not exist: expected a local Hugging Face masked-LM folder "
                            "(config.json, weights, tokenizer files) or a hub id such as roberta-large")
    cfg_path = local / "config.json"
    if local.is_dir() and cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ModelDirError(f"{cfg_path} is not readable JSON ({' '.join(str(e).split())[:120]}): expected the "
                                "config.json of a Hugging Face model; restore it") from None
        if not isinstance(raw, dict):
            raise ModelDirError(f"{cfg_path} holds a {type(raw).__name__}, expected a JSON object: restore it")
        archs = raw.get("architectures")
        mlm = ("ForMaskedLM", "ForPreTraining")
        if not random_init and isinstance(archs, list) and archs and not any(
                isinstance(x, str) and x.endswith(mlm) for x in archs):
            raise ModelDirError(f"model folder {model} holds a {', '.join(map(str, archs))} (config.json "
                                "architectures), expected a masked language model with its MLM head "
                                "(*ForMaskedLM): export a checkpoint that has the head, e.g. BertForMaskedLM, or "
                                "pass --random-init for random weights")
        if tokenizer is None and not any((local / f).is_file() for f in tok_files):
            # transformers would silently make an empty default tokenizer (every word [UNK])
            raise ModelDirError(f"model folder {model} has no tokenizer files (tokenizer.json, or vocab.txt / "
                                "vocab.json + merges.txt): copy the model's tokenizer files into it, or pass "
                                "--tokenizer with a folder or hub id that has them")
    tdir = Path(os.path.expanduser(tokenizer)) if tokenizer is not None else None
    if tdir is not None and tdir.is_dir() and not any((tdir / f).is_file() for f in tok_files):
        raise ModelDirError(f"--tokenizer {tokenizer} has no tokenizer files (tokenizer.json, or vocab.txt / "
                            "vocab.json + merges.txt): pass the folder of the model's tokenizer")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file, expected a folder for the model dir: pass another --out")


def cmd_export(a) -> int:
    import os

    _check_export_source(a.model, a.out, a.random_init, a.tokenizer)
    try:
        from cliptune_export import ExportError, ExportOptions, export_model
    except ImportError as e:
        raise ConfigError(f"`cliptune export` needs the export extra ({e.name} is missing): "
                          "pip install torch==2.13.0 && pip install -e '.[export]'") from None
    opts = ExportOptions(k=a.k, p=a.p, seed=a.seed, n_prompt=a.n_prompt, random_init=a.random_init,
                         tokenizer=a.tokenizer, overwrite=a.overwrite, precision=a.precision,
                         int8_weights=a.int8_weights, fold_masks=a.fold_masks, share_prefix=a.share_prefix,
                         packed=a.packed)
    if a.packed_kernel is not None:
        opts.packed_kernel = a.packed_kernel
    opts.packed_ffn = a.packed_ffn
    opts.packed_front = a.packed_front
    opts.prompt_dtype = a.prompt_dtype
    opts.packed_q_bias = a.packed_q_bias
    if a.atol is not None:
        opts.atol = a.atol
    try:
        man = export_model(a.model, a.out, opts)
    except (CliptuneError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # torch/transformers/onnx on a folder they cannot handle: one line, exit 2
        if os.environ.get("CLIPTUNE_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300] or "no message"
        raise ExportError(f"export of {a.model} failed ({type(e).__name__}: {msg}): expected a BERT- or "
                          "RoBERTa-style *ForMaskedLM folder with config.json, weights and tokenizer files; check "
                          "the folder (CLIPTUNE_DEBUG=1 shows the traceback)") from e
    print(json.dumps({"out": a.out, "graphs": {g["file"]: g["max_abs_diff"] for g in man["graphs"]}}, indent=1))
    return 0


def _tune_one(a, flags: dict, out: Path | None) -> tuple[dict, Path]:
    """One run of ``cliptune tune``: its result and run dir (``out``, or the default for its settings)."""
    from .config import build_config
    from .tuner import tune

    cfg = build_config(a.config, **flags)
    out = out or _default_run_dir(cfg)
    if a.resume and (out / "config.json").is_file():
        # resume with the run's own settings; flags given now override them (and are checked)
        from .predict import read_run_config

        base = read_run_config(out, check_task_file=False)  # tune() compares a task file's digest itself
        if a.config is not None:
            base.update(json.loads(Path(a.config).read_text(encoding="utf-8")))
        cfg = build_config(None, **{**base, **{k: v for k, v in flags.items() if v is not None}})
    res = tune(cfg, out, resume=a.resume, overwrite=a.overwrite, force_resume=a.force_resume, progress=not a.quiet)
    return res, out


def cmd_tune(a) -> int:
    from .tuner import RunInterrupted

    if a.seeds is not None:
        return _tune_seeds(a)
    try:
        res, out = _tune_one(a, _tune_flags(a), Path(a.out) if a.out else None)
    except RunInterrupted as e:
        print(f"cliptune: {e}", file=sys.stderr)
        return 130
    _print_result(res, out)
    return 0


def parse_seeds(text: str) -> list[int]:
    """``--seeds 13,21,42``: distinct non-negative integers, in the order given."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2**32:
        raise ConfigError(f"--seeds {text!r}: expected distinct integers in 0..2**32-1, comma-separated, e.g. "
                          "13,21,42,87,100 (BBT's five)")
    return seeds


def _spread(values: list[float]) -> dict | None:
    import numpy as np

    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": len(v)}


def _tune_seeds(a) -> int:
    """``cliptune tune --seeds S1,S2,...``: one run per seed in OUT/seed<s>, then OUT/summary.json (and .md): each
    run's metrics and their mean, sample std (ddof 1), min and max over the seeds. ``--resume`` continues every
    seed's run (a finished one returns its result); the summary is rewritten after each run."""
    from .config import build_config
    from .fileio import atomic_write_json, atomic_write_text
    from .tuner import RunInterrupted

    if a.seed is not None:
        raise ConfigError("pass --seed (one run) or --seeds (one run per seed), not both")
    seeds = parse_seeds(a.seeds)
    flags = _tune_flags(a)
    first = build_config(a.config, **{**flags, "seed": seeds[0]})
    root = Path(a.out) if a.out else Path("runs") / f"{_task_name(first)}_{first.method}_seeds"
    runs: list[dict] = []
    for seed in seeds:
        try:
            res, out = _tune_one(a, {**flags, "seed": seed}, root / f"seed{seed}")
        except RunInterrupted as e:
            print(f"cliptune: {e}", file=sys.stderr)
            print(f"cliptune: to continue every seed: cliptune tune --seeds {a.seeds} --out {root} --resume",
                  file=sys.stderr)
            return 130
        _print_result(res, out)
        runs.append({"seed": seed, "run_dir": str(out), "train": res["train"]["metric"], "dev": res["dev"]["metric"],
                     "test": res["test"]["metric"] if res.get("test") else None, "calls": res["calls"],
                     "wall_seconds": res["wall_seconds"]})
        summary = {"task": res["task"], "method": res["method"], "metric": res["metric"], "seeds": seeds,
                   "finished": [r["seed"] for r in runs], "runs": runs,
                   **{f"{k}_metric": _spread([r[k] for r in runs if r[k] is not None]) for k in ("train", "dev", "test")}}
        atomic_write_json(root / "summary.json", summary)
        atomic_write_text(root / "summary.md", _seeds_markdown(summary))
    line = {"out": str(root), "task": summary["task"], "method": summary["method"], "seeds": seeds}
    for k in ("dev", "test"):
        sp = summary[f"{k}_metric"]
        line[f"{k}_metric_mean"], line[f"{k}_metric_std"] = (sp["mean"], sp["std"]) if sp else (None, None)
    print(json.dumps(line))
    return 0


def _seeds_markdown(s: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.4f}"

    rows = [f"# {s['task']} {s['method']}: {len(s['finished'])} of {len(s['seeds'])} seeds ({s['metric']})", "",
            "| seed | train | dev | test | calls | wall s |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['seed']} | {cell(r['train'])} | {cell(r['dev'])} | {cell(r['test'])} | {r['calls']} | "
             f"{r['wall_seconds']:.1f} |" for r in s["runs"]]
    for k in ("train", "dev", "test"):
        sp = s[f"{k}_metric"]
        if sp:
            rows.append(f"\n{k}: mean {sp['mean']:.4f}, std {sp['std']:.4f} (ddof 1), min {sp['min']:.4f}, "
                        f"max {sp['max']:.4f}, n {sp['n']}")
    return "\n".join(rows) + "\n"


def _print_result(res: dict, out: Path) -> None:
    test = res["test"]["metric"] if res.get("test") else None
    line = {"run_dir": str(out), "task": res["task"], "method": res["method"], "seed": res["seed"],
            "train_metric": res["train"]["metric"], "dev_metric": res["dev"]["metric"],
            "test_metric": test, "metric": res["metric"], "calls": res["calls"],
            "forward_passes": res["forward_passes"], "wall_seconds": res["wall_seconds"],
            "provider": res["provider"]}
    print(json.dumps(line))


def cmd_bench(a) -> int:
    from . import bench
    from .config import build_config
    from .fileio import atomic_write_json, atomic_write_text

    cfg = build_config(a.config, **_tune_flags(a))
    pops = bench.parse_pops(a.pops) if a.pops else sorted({1, cfg.popsize})
    into = a.out is not None and (Path(a.out).is_dir() or a.out.endswith(("/", os.sep)))  # a folder: default name
    if a.out and not into and Path(a.out).suffix != ".json":
        raise ConfigError(f"--out {a.out}: expected a .json file path (the table goes beside it as .md) or a folder")

    def log(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    opts = {k: v for k, v in (("seconds", a.seconds), ("min_calls", a.min_calls), ("max_calls", a.max_calls),
                              ("warmup", a.warmup)) if v is not None}
    res = bench.run_bench(cfg, pops, log=log, **opts)
    name = f"bench_{_task_name(cfg)}_{cfg.method}_{res['device']}.json"
    out = Path(a.out) / name if into else Path(a.out) if a.out else Path("runs") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    atomic_write_text(out.with_suffix(".md"), bench.markdown(res))
    proj = res["projected_tune_s"]
    print(json.dumps({"out": str(out), "provider": res["provider"],
                      "generation_p50_ms": {p: g["p50_ms"] for p, g in res["generation"].items()},
                      "projected_tune_s": proj["total"] if proj else None}))
    return 0


def cmd_tasks(a) -> int:
    """One JSON line per task: the built-ins' specs, or each named task checked as a run would see it."""
    from .config import build_config
    from .taskinfo import check, describe
    from .tasks import TASKS
    from .tuner import task_for

    names = list(a.tasks) + ([a.task] if a.task else [])
    if not names:
        for spec in TASKS.values():
            print(json.dumps(describe(spec)))
        return 0
    flags = _tune_flags(a)
    for name in names:
        cfg = build_config(a.config, **{**flags, "task": name})
        print(json.dumps(check(cfg, task_for(cfg))), flush=True)
    return 0


def cmd_eval(a) -> int:
    from .predict import evaluate_run

    if a.input is not None and a.split is not None:
        raise ConfigError("eval takes --split or --input FILE, not both")
    res = evaluate_run(a.run_dir, a.split or "test", device=a.device, input_path=a.input)
    print(json.dumps(res))
    return 0


def cmd_predict(a) -> int:
    from collections import Counter

    from .fileio import atomic_write_text
    from .predict import predict, predict_file

    if (a.text is None) == (a.input is None):
        raise ConfigError("predict needs the texts: pass --text (repeatable) or --input FILE, not both")
    if a.input is not None and a.text_b:
        raise ConfigError("--text-b goes with --text; with --input, give each row its second text in the file")
    if a.output is not None and (Path(a.output).is_dir() or Path(a.output).resolve() == Path(a.input or "").resolve()):
        raise ConfigError(f"--output {a.output}: expected a file path to write (not a folder, not the input file)")
    rows = predict_file(a.run_dir, a.input, device=a.device) if a.input else \
        predict(a.run_dir, a.text, a.text_b, device=a.device)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if a.output is None:
        sys.stdout.write(lines)
        return 0
    atomic_write_text(a.output, lines)
    counts = Counter(r["label_name"] for r in rows)
    print(json.dumps({"output": a.output, "rows": len(rows), "per_label": dict(counts)}))
    return 0


def cmd_deploy(a) -> int:
    try:
        import onnx  # noqa: F401
        from cliptune_export.deploy import DeployOptions, deploy_run
    except ImportError as e:
        raise ConfigError(f"`cliptune deploy` needs the onnx package ({e.name} is missing): "
                          "pip install -e '.[export]' (or pip install onnx)") from None
    opts = DeployOptions(int8=a.int8, int8_weights=a.int8_weights,
                         check_split=None if a.check_split == "none" else a.check_split, overwrite=a.overwrite,
                         model_dir=a.model_dir)
    meta = deploy_run(a.run_dir, a.out, opts)
    print(json.dumps({"out": a.out, "sidecar": str(Path(a.out).with_suffix(".json")), "task": meta["task"],
                      "precision": meta["onnx"]["precision"], "bytes": meta["onnx"]["bytes"], "check": meta["check"]}))
    return 0


def cmd_env(a) -> int:
    import importlib.metadata as md
    import platform

    import onnxruntime as ort

    info = {"cliptune_ort": __import__("cliptune_ort").__version__, "python": platform.python_version(),
            "platform": platform.platform(), "onnxruntime": ort.__version__,
            "onnxruntime_device": ort.get_device(), "providers": ort.get_available_providers()}
    for pkg in ("numpy", "cma", "tokenizers", "datasets", "torch", "transformers", "onnx"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    from .native import VARIANTS, lib_name, ops_dir

    # the custom-op library (`cliptune build-ops`): built variants, for --packed-ffn cublaslt exports
    info["ops_library"] = {v: str(ops_dir() / lib_name(v)) if (ops_dir() / lib_name(v)).is_file() else None
                           for v in VARIANTS}
    from .sessions import cpu_flags, int8_saturates

    # whether ONNX Runtime's int8 kernels here saturate full-range int8 weights (--int8-weights; None: unknown CPU)
    flags = cpu_flags()
    info["int8_full_range_saturates"] = None if flags is None else int8_saturates("int8", flags)
    print(json.dumps(info, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. A CliptuneError (bad input), an OSError (disk full, permissions) or a MemoryError is
    one line on stderr and exit status 2; an interrupt exits 130 saying how to resume; warnings are one line
    each. ``CLIPTUNE_DEBUG=1`` shows tracebacks instead of the OS and memory one-liners."""
    import os
    import warnings

    ap = build_parser()
    a = ap.parse_args(argv)
    from .native import run_build

    handlers = {"export": cmd_export, "tune": cmd_tune, "bench": cmd_bench, "eval": cmd_eval, "predict": cmd_predict,
                "env": cmd_env, "deploy": cmd_deploy, "build-ops": run_build, "tasks": cmd_tasks}
    debug = bool(os.environ.get("CLIPTUNE_DEBUG"))

    def error(msg: str) -> None:
        print(f"cliptune: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)

    def warning_line(message, category, filename, lineno, file=None, line=None):
        print(f"cliptune: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = warning_line  # one line per warning, like the errors
        try:
            return handlers[a.cmd](a)
        except CliptuneError as e:
            error(str(e))
            return e.exit_code
        except KeyboardInterrupt:
            if a.cmd == "tune":
                out = getattr(a, "out", None) or "RUN_DIR"
                error("interrupted: stopped at once; progress since the last checkpoint is lost. Resume with: "
                      f"cliptune tune --resume --out {out} (same settings)")
            else:
                error(f"interrupted: `cliptune {a.cmd}` stopped before it finished; run it again")
            return 130
        except MemoryError:
            if debug:
                raise
            error("out of memory: expected the work to fit in RAM; lower --popsize, --d, --eval-chunk or "
                  "--cands-per-call, or use a smaller model (CLIPTUNE_DEBUG=1 shows the traceback)")
            return 2
        except BrokenPipeError:  # the reader went away (`cliptune tasks | head`): stop quietly, as a Unix tool does
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 141
        except OSError as e:  # disk full, permissions, a path that vanished: the environment, not a bug
            if debug:
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            error(f"{e.strerror or e}{where}: check the path, its permissions and the free disk space "
                  "(CLIPTUNE_DEBUG=1 shows the traceback)")
            return 2


if __name__ == "__main__":
    sys.exit(main())
