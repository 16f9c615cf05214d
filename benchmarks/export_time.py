"""A whole `cliptune export` of a RoBERTa shape (random weights: the time is a property of the shape), timed by
phase, in a fresh process per repeat; optionally against another checkout of the repository (an A/B of the
exporter's code on the same machine, one after the other).

Each export's own log lines (``[export] <seconds> s <what>``) give the phases: load, trace, convert, write the
graphs (and their weights), share the weights (the traced path), validate, pack. Also recorded: the child's peak
RSS, and the sha256 of ``weights.bin`` and of the manifest's tensor table, so an A/B also says whether both
checkouts wrote the same weights (the graph files hold a random export id).

    python benchmarks/export_time.py                                    # roberta-large fp16 K = 4, this checkout
    python benchmarks/export_time.py --checkout before=/tmp/old --repeats 1     # against another checkout
    python benchmarks/export_time.py --shape roberta-base --precision fp32
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness
from export_convert import SHAPES, sha256

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
a = json.loads(sys.argv[1])
import torch
from cliptune_export import ExportOptions, export_model
t = time.perf_counter()
man = export_model(a["src"], a["out"], ExportOptions(random_init=True, init_seed=0, overwrite=True, **a["opts"]))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "parity": [g["max_abs_diff"] for g in man["graphs"]], "exporter": __import__("cliptune_export").__file__}))
"""

#: a log line's start -> the phase it opens
PHASES = (("loading", "load"), ("exporting the ", "trace"), ("exporting graph_", "trace"),
          ("converting", "convert"), ("writing graph_", "write graphs"), ("sharing weights", "share weights"),
          ("validating", "validate"), ("  graph_", "validate"), ("packing", "pack"), ("wrote ", None))
PHASE_NAMES = list(dict.fromkeys(p for _, p in PHASES if p))
LINE = re.compile(r"^\[export\]\s+([0-9.]+) s  (.*)$")


def phases(log: str) -> dict[str, float]:
    """Seconds per phase from an export's log lines (a phase runs from its first line to the next phase's)."""
    marks = []
    for line in log.splitlines():
        m = LINE.match(line)
        if m:
            name = next((p for start, p in PHASES if m.group(2).startswith(start)), "other")
            marks.append((float(m.group(1)), name))
    out: dict[str, float] = {}
    for (t, name), (t_next, _) in itertools.pairwise(marks):
        if name is not None:
            out[name] = round(out.get(name, 0.0) + t_next - t, 2)
    return out


def import_root(checkout: Path, work: Path) -> Path:
    """A folder that makes ``checkout``'s packages importable ahead of the installed ones (PYTHONPATH)."""
    d = work / f"import_{hashlib.sha256(str(checkout).encode()).hexdigest()[:8]}"
    d.mkdir(exist_ok=True)
    for name, target in (("cliptune_ort", checkout / "cliptune_ort"), ("cliptune_export", checkout / "export")):
        if not (d / name).exists():
            (d / name).symlink_to(target)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="roberta-large", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="exports per checkout (alternating)")
    ap.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR",
                    help="another checkout of the repository to time the same way (repeatable)")
    ap.add_argument("--out", default=str(harness.results_path("export_time")))
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-wait", action="store_true")
    args = ap.parse_args(argv)
    checkouts = {"this": ROOT}
    for spec in args.checkout:
        name, sep, d = spec.partition("=")
        if not sep or not (Path(d) / "export" / "exporter.py").is_file():
            ap.error(f"--checkout {spec!r}: expected NAME=DIR, DIR a checkout of this repository")
        checkouts[name] = Path(d).resolve()

    wait = None if args.no_wait else harness.wait_for_quiet(args.max_load)
    work = Path(tempfile.mkdtemp(prefix="export_time_"))
    src = work / "src"
    src.mkdir()
    harness.roberta_config(SHAPES[args.shape]).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(harness.SPLADE / f, src / f)
    load0 = harness.load_average()
    runs = []
    try:
        for r in range(args.repeats):
            for name, checkout in checkouts.items():
                out = work / f"out_{name}"
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [str(import_root(checkout, work))] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                                                          else [])))
                p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(
                    {"src": str(src), "out": str(out), "opts": {"k": args.k, "precision": args.precision}})],
                    check=False, capture_output=True, text=True, env=env, cwd=str(work))
                if p.returncode:
                    sys.stderr.write(p.stderr[-3000:])
                    raise SystemExit(f"export_time: the export of checkout {name} failed (rc {p.returncode})")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                if not res["exporter"].startswith(str(work)):
                    raise SystemExit(f"export_time: checkout {name} ran {res['exporter']}, not its own exporter")
                man = json.loads((out / "manifest.json").read_text())
                row = {"checkout": name, "repeat": r + 1, "seconds": round(res["seconds"], 2),
                       "peak_rss_mb": round(res["peak_rss_mb"], 1), **phases(p.stderr),
                       "weights_sha256": sha256(out / "weights.bin"),
                       "tensor_table_sha256": hashlib.sha256(json.dumps(man["weights"]["tensors"]).encode()).hexdigest(),
                       "parity_max": max(res["parity"])}
                runs.append(row)
                print(f"repeat {r + 1}, {name}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB, "
                      + ", ".join(f"{ph} {row[ph]} s" for ph in PHASE_NAMES if ph in row), flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = len({(r["weights_sha256"], r["tensor_table_sha256"]) for r in runs}) == 1
    summary = [{"checkout": name, **harness.summarize([r["seconds"] for r in runs if r["checkout"] == name])}
               for name in checkouts]
    payload = {"benchmark": "export_time", "machine": harness.machine_info(), "versions": harness.versions(torch=True),
               "wait": wait, "load_average_start": load0, "load_average_end": harness.load_average(),
               "settings": {"shape": args.shape, "precision": args.precision, "k": args.k, "repeats": args.repeats,
                            "checkouts": {k: str(v) for k, v in checkouts.items()}},
               "runs": runs, "summary": summary, "same_weights": same}
    out = Path(args.out)
    harness.write_json(out.with_suffix(".json"), payload)
    cols = [("checkout", "checkout"), ("repeat", "repeat"), ("seconds", "total s"), ("peak_rss_mb", "peak RSS MB")] + [
        (ph, f"{ph} s") for ph in PHASE_NAMES if any(ph in r for r in runs)]
    head = (f"{args.shape} {args.precision} K = {args.k}, a fresh process per export; "
            f"the same weights.bin and tensor table: {same}")
    harness.write_markdown(out.with_suffix(".md"), "A whole export, by phase", payload,
                           [(head, harness.markdown_table(runs, cols))])
    print(f"same weights: {same}; wrote {out.with_suffix('.json')}", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
