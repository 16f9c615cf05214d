"""Accuracy sweep: methods x tasks x seeds at the default budget, resumable per cell.

    python benchmarks/accuracy.py                          # the full sweep (hours on 2 cores)
    python benchmarks/accuracy.py --tasks sst2 --methods manual,bbt,clip_k4 --seeds 13,42,100
    python benchmarks/accuracy.py --report-only            # rebuild table/plot from finished cells
    python benchmarks/accuracy.py --import-cells /tmp/accout runs.tar.gz   # add cells swept elsewhere

Each cell is one `cliptune tune` run in OUT/runs/<task>/<method>/seed<seed>/; a finished cell (result.json)
is skipped and an unfinished one resumes from its checkpoint, so a crashed sweep continues where it
stopped. Writes OUT/results.json (every finished cell), OUT/table.md (mean +- std over seeds per task and
method, plus the average over tasks) and OUT/dev_vs_calls.png (dev metric vs calls, BBT vs Clip-Tuning).
Prompts are selected on dev only; test is evaluated once per cell at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliptune_ort.config import DEVICES, build_config  # noqa: E402
from cliptune_ort.errors import CliptuneError
from cliptune_ort.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from cliptune_ort.tasks import TASKS  # noqa: E402

#: method name -> settings (every method uses the default budget, popsize, d, sigma0)
METHODS = {
    "manual": dict(method="manual"),
    "bbt": dict(method="bbt"),
    "clip_k4": dict(method="clip", k=4, p=0.1),
    "random": dict(method="bbt", optimizer="random"),
    "clip_k2": dict(method="clip", k=2, p=0.1),
    "clip_k8": dict(method="clip", k=8, p=0.1),
    "clip_k4_p0.05": dict(method="clip", k=4, p=0.05),
    "clip_k4_p0.2": dict(method="clip", k=4, p=0.2),
}
TASK_ORDER = ["sst2", "yelp_polarity", "ag_news", "dbpedia", "mrpc", "snli", "rte"]
SEEDS = [13, 21, 42, 87, 100]


def cell_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "runs" / task / method / f"seed{seed}"


def run_cell(out: Path, task: str, method: str, seed: int, budget: int | None, device: str | None = None) -> dict:
    from cliptune_ort.tuner import tune

    d = cell_dir(out, task, method, seed)
    if (d / "result.json").is_file():
        return json.loads((d / "result.json").read_text())
    overrides = dict(task=task, seed=seed, **METHODS[method])
    if budget is not None:
        overrides["budget"] = budget
    if device is not None:
        overrides["device"] = device
    cfg = build_config(**overrides)
    resume = (d / "checkpoint.json").exists() or (d / "checkpoint.prev.json").exists()
    if d.exists() and not resume:
        import shutil

        shutil.rmtree(d)  # a cell that died before its first checkpoint starts over
    return tune(cfg, d, resume=resume, progress=False)


def collect(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "runs").glob("*/*/seed*/result.json")):
        r = json.loads(f.read_text())
        method = f.parent.parent.name
        rows.append({
            "task": r["task"], "method": method, "seed": r["seed"], "metric": r["metric"],
            "dev": r["dev"]["metric"], "test": r["test"]["metric"] if r["test"] else None,
            "test_n": r["test"]["n"] if r["test"] else 0, "test_note": r.get("test_note"),
            "train": r["train"]["metric"], "calls": r["calls"], "forward_passes": r["forward_passes"],
            "wall_seconds": r["wall_seconds"], "fewshot": r["fewshot"].get("fewshot"),
            "budget": r["budget"], "k": r["k"], "p": r["p"], "optimizer": r["optimizer"],
            # which graphs scored it: the export cache folder name carries the export format (_f2, ...)
            "export": Path(r["model_dir"]).name if r.get("model_dir") else None, "export_id": r.get("export_id"),
            "provider": r.get("provider"),
        })
    return rows


def _cell_source(src: Path, tmp: Path) -> Path:
    """The ``runs`` folder of an accuracy.py --out folder or of a ``runs.tar.gz`` (benchmarks/pack_out.py)."""
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(src) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")  # no absolute paths, links or '..' out of tmp
            else:  # pragma: no cover (Python < 3.10.12)
                if any(m.name.startswith(("/", "..")) or ".." in Path(m.name).parts for m in tar.getmembers()):
                    raise CliptuneError(f"{src}: an archive member points outside it; expected runs.tar.gz from pack_out.py")
                tar.extractall(tmp)
        root = tmp
    elif src.is_dir():
        root = src
    else:
        raise CliptuneError(f"{src}: not found; expected an accuracy.py --out folder (holding runs/) or runs.tar.gz")
    if not (root / "runs").is_dir():
        raise CliptuneError(f"{src}: holds no runs/ folder; expected an accuracy.py --out folder or runs.tar.gz")
    return root / "runs"


def import_cells(out: Path, sources: list[Path]) -> tuple[list[str], float]:
    """Copy the finished cells (those with a result.json) of other sweeps into ``out``; a cell ``out``
    has finished already is kept, an unfinished one there is replaced by the finished copy. Returns the
    imported cells and the sum of their wall times (each cell counts once, however often a source is
    imported; a source's export and idle time is not in it)."""
    imported, skipped, unfinished, wall = [], [], 0, 0.0
    for src in sources:
        with tempfile.TemporaryDirectory() as tmp:
            runs = _cell_source(Path(src), Path(tmp))
            for d in sorted(p for p in runs.glob("*/*/seed*") if p.is_dir()):
                task, method, seed = d.parent.parent.name, d.parent.name, d.name
                if task not in TASKS or method not in METHODS or not re.fullmatch(r"seed\d+", seed):
                    raise CliptuneError(f"{d}: not a cell of this sweep (expected runs/<task>/<method>/seed<N>/ with "
                                        f"tasks {sorted(TASKS)}, methods {list(METHODS)})")
                if not (d / "result.json").is_file():
                    unfinished += 1
                    continue
                r = json.loads((d / "result.json").read_text())
                if r.get("task") != task or f"seed{r.get('seed')}" != seed:
                    raise CliptuneError(f"{d}/result.json is task {r.get('task')} seed {r.get('seed')}: it does not "
                                        "belong in this folder; expected runs/<task>/<method>/seed<N>/")
                dest = out / "runs" / task / method / seed
                name = f"{task} {method} {seed}"
                if (dest / "result.json").is_file():
                    skipped.append(name)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.parent / f".{seed}.import"
                shutil.rmtree(part, ignore_errors=True)
                shutil.copytree(d, part)
                if dest.exists():
                    print(f"[accuracy] {name}: the unfinished cell here is replaced by the finished one from {src}")
                    shutil.rmtree(dest)
                part.rename(dest)
                imported.append(name)
                wall += float(r.get("wall_seconds") or 0.0)
    print(f"[accuracy] imported {len(imported)} finished cells" + (f": {', '.join(imported)}" if imported else "")
          + f"; {len(skipped)} already finished here, {unfinished} unfinished left out", flush=True)
    return imported, wall


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    a = np.asarray(vals) * 100
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f} (n={len(a)})"


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, task) -> its finished cells."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["task"]), []).append(r)
    return groups


def _comp_cells(c: dict) -> tuple[str, str, str]:
    """A comparison record's std of the paired differences, paired t and BBT's seed std, as table text."""
    std = "-" if c["diff_std"] is None else f"{c['diff_std'] * 100:.1f}"
    pt = "-" if c["paired_t"] is None else f"{c['paired_t']:+.1f}"
    bstd = "-" if c["bbt_seed_std"] is None else f"{c['bbt_seed_std'] * 100:.1f}"
    return std, pt, bstd


def table(rows: list[dict], methods: list[str], tasks: list[str]) -> str:
    notes = {t: TASKS[t].test_note for t in tasks}

    groups = _groups(rows)
    tests = {k: [r["test"] for r in rs if r["test"] is not None] for k, rs in groups.items()}
    means = {k: float(np.mean(v)) for k, v in tests.items() if v}  # (method, task) -> mean test metric

    # averages over different task sets do not compare: the last column averages only over the tasks that
    # every method run on more than one task has test numbers for
    broad = [m for m in methods if sum((m, t) in means for t in tasks) > 1]
    common = [t for t in tasks if broad and all((m, t) in means for m in broad)]
    lines = ["| method | " + " | ".join(tasks) + " | average (tasks) | average on " + "/".join(common or ["-"]) + " |",
             "|---" * (len(tasks) + 3) + "|"]
    for m in methods:
        cells = []
        for t in tasks:
            if (m, t) in means:
                cells.append(_fmt(tests[m, t]))
            elif (m, t) in groups:
                cells.append("no test split offline; dev " + _fmt([r["dev"] for r in groups[m, t]]))
            else:
                cells.append("-")
        mine = [means[m, t] for t in tasks if (m, t) in means]
        avg = f"{np.mean(mine) * 100:.1f} ({len(mine)})" if mine else "-"
        cavg = f"{np.mean([means[m, t] for t in common]) * 100:.1f}" if m in broad and common else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {cavg} |")
    lines.append("")
    lines.append("Test metric in % (accuracy; F1 for MRPC), mean ± std over seeds (n = seeds finished). "
                 "Prompts selected on dev only.")
    for t in tasks:
        if notes[t]:
            lines.append(f"- {t}: {notes[t]}")
    cuda: dict[tuple[str, str], list[int]] = {}
    for r in rows:  # a cell scored on a GPU (same method and seeds; float rounding differs from the CPU's)
        if r.get("provider") == "CUDAExecutionProvider" and r["task"] in tasks and r["method"] in methods:
            cuda.setdefault((r["task"], r["method"]), []).append(r["seed"])
    if cuda:
        lines.append("- scored with ONNX Runtime's CUDA provider (fp32, TF32 off), every other cell on the CPU: "
                     + "; ".join(f"{t} {m} seeds {', '.join(map(str, sorted(s)))}" for (t, m), s in sorted(cuda.items())))
    return "\n".join(lines) + "\n"


def comparison(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Per task: best clip K vs bbt on test (paired by seed), with the seed std.

    Only the K values that ran at every seed the best-covered K ran at compete (a K with fewer seeds is listed
    in ``partial``), so the best K is never picked on a luckier, smaller sample; it is chosen on mean *dev*,
    never on test."""
    out = []
    for t in tasks:
        bbt = {r["seed"]: r for r in rows if r["task"] == t and r["method"] == "bbt"}
        key = "test" if any(r["test"] is not None for r in bbt.values()) else "dev"
        runs = {m: {r["seed"]: r for r in rows if r["task"] == t and r["method"] == m}
                for m in ("clip_k2", "clip_k4", "clip_k8")}
        paired = {m: s for m, cl in runs.items() if (s := sorted(set(bbt) & set(cl)))}
        if not paired:
            continue
        n_max = max(len(s) for s in paired.values())
        full = {m: s for m, s in paired.items() if len(s) == n_max}
        seeds = sorted(set.intersection(*(set(s) for s in full.values())))
        if not seeds:  # equally covered K values on disjoint seeds: compare the first one alone
            m0 = min(full)
            full, seeds = {m0: full[m0]}, full[m0]
        best = None
        for m in full:
            cl = runs[m]
            dev_mean = float(np.mean([cl[s]["dev"] for s in seeds]))
            if best is None or dev_mean > best["dev_mean"]:
                diffs = [cl[s][key] - bbt[s][key] for s in seeds]
                sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
                best = {"task": t, "clip": m, "seeds": seeds, "on": key, "dev_mean": dev_mean,
                        "compared": sorted(full), "partial": sorted(set(paired) - set(full)),
                        "clip_mean": float(np.mean([cl[s][key] for s in seeds])),
                        "bbt_mean": float(np.mean([bbt[s][key] for s in seeds])),
                        "mean_diff": float(np.mean(diffs)), "diff_std": sd,
                        "paired_t": float(np.mean(diffs) / (sd / np.sqrt(len(diffs)))) if sd else None,
                        "bbt_seed_std": float(np.std([bbt[s][key] for s in seeds], ddof=1)) if len(seeds) > 1
                        else None}
        out.append(best)
    return out


#: the dropout-rate variants of Clip-Tuning K = 4, lowest rate first (p = 0.1 is clip_k4)
P_RATES = (("clip_k4_p0.05", 0.05), ("clip_k4", 0.1), ("clip_k4_p0.2", 0.2))


def p_rates(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Per task: the metric (test; dev where a task has no test split) of K = 4 at p = 0.05 / 0.1 / 0.2 per
    seed, and over the seeds where all three rates ran: the means and at how many seeds each other rate
    beat p = 0.1 (same seed, so the few-shot sample, A and the CMA-ES seed are shared)."""
    out = []
    for t in tasks:
        by = {m: {r["seed"]: r for r in rows if r["task"] == t and r["method"] == m} for m, _ in P_RATES}
        if not by[P_RATES[0][0]] and not by[P_RATES[2][0]]:
            continue
        key = "test" if any(r["test"] is not None for cl in by.values() for r in cl.values()) else "dev"
        seeds = sorted(set().union(*by.values()))
        per_seed = {s: [by[m][s][key] if s in by[m] else None for m, _ in P_RATES] for s in seeds}
        full = [s for s in seeds if all(v is not None for v in per_seed[s])]
        rec = {"task": t, "on": key, "p": [p for _, p in P_RATES], "per_seed": per_seed, "full_seeds": full}
        if full:
            rec["means"] = [float(np.mean([per_seed[s][i] for s in full])) for i in range(len(P_RATES))]
            rec["above_p0.1"] = {str(P_RATES[i][1]): sum(per_seed[s][i] > per_seed[s][1] for s in full)
                                 for i in (0, 2)}
        out.append(rec)
    return out


def p_rate_table(recs: list[dict], label=lambda t: t) -> str:
    """Markdown: one row per seed, one column per task, 'p=0.05 / 0.1 / 0.2' in each cell; then the means."""
    if not recs:
        return ""
    seeds = sorted({s for r in recs for s in r["per_seed"]})
    head = " / ".join(f"{p:g}" for _, p in P_RATES)
    lines = [f"| p = {head} | " + " | ".join(label(r["task"]) + (" (dev)" if r["on"] == "dev" else "") for r in recs)
             + " |",
             "|---" * (len(recs) + 1) + "|"]

    def fmt(vs):
        return " / ".join("-" if v is None else f"{100 * v:.1f}" for v in vs)

    for s in seeds:
        lines.append(f"| seed {s} | " + " | ".join(fmt(r["per_seed"][s]) if s in r["per_seed"] else "-"
                                                   for r in recs) + " |")
    lines.append("| mean (seeds with all three) | " + " | ".join(
        f"{fmt(r['means'])} (n={len(r['full_seeds'])})" if r["full_seeds"] else "-" for r in recs) + " |")
    return "\n".join(lines) + "\n"


#: the README's names for the tasks and methods, methods in the README's row order
README_TASKS = {"sst2": "SST-2", "yelp_polarity": "Yelp P.", "ag_news": "AG News", "dbpedia": "DBpedia",
                "mrpc": "MRPC", "snli": "SNLI", "rte": "RTE"}
README_METHODS = {"manual": "manual", "bbt": "bbt", "random": "random search", "clip_k2": "clip K = 2",
                  "clip_k4": "clip K = 4", "clip_k8": "clip K = 8", "clip_k4_p0.05": "clip K = 4, p = 0.05",
                  "clip_k4_p0.2": "clip K = 4, p = 0.2"}
#: footnote marks the README's prose explains below the all-tasks table
README_MARKS = {"yelp_polarity": " (dev ¹)", "dbpedia": " ²"}


def readme_blocks(rows: list[dict], comp: list[dict], rates: list[dict]) -> dict[str, str]:
    """The README's three accuracy tables (all tasks; best K vs BBT; the dropout rate) from the same numbers
    as table.md, in the README's names; ``update_readme`` puts them between its markers."""
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
    groups = _groups(rows)
    lines = ["| method | " + " | ".join(README_TASKS[t] + README_MARKS.get(t, "") for t in tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    for m, name in README_METHODS.items():
        if not any(m == k[0] for k in groups):
            continue
        cells = []
        for t in tasks:
            rs = groups.get((m, t), [])
            tests = [r["test"] for r in rs if r["test"] is not None]
            cells.append(_fmt(tests) if tests else _fmt([r["dev"] for r in rs]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    blocks = {"all-tasks": "\n".join(lines) + "\n"}
    lines = [("| task | seeds | best K (of) | clip | bbt | diff | std of diff | paired t | bbt seed std | "
              "beyond seed std? |"), "|---" * 10 + "|"]
    for c in comp:
        name = README_TASKS[c["task"]] + (" (dev)" if c["on"] == "dev" else "")
        ks = "/".join(m.removeprefix("clip_k") for m in c["compared"])
        beyond = "-"
        if c["bbt_seed_std"] is not None:
            worse = "clip worse" if c["mean_diff"] < 0 else "clip better"
            beyond = f"yes: {worse}" if abs(c["mean_diff"]) > c["bbt_seed_std"] else "no"
        std, pt, bstd = _comp_cells(c)
        lines.append(f"| {name} | {', '.join(map(str, c['seeds']))} | {c['clip'].removeprefix('clip_k')} ({ks}) | "
                     f"{c['clip_mean'] * 100:.1f} | {c['bbt_mean'] * 100:.1f} | {c['mean_diff'] * 100:+.1f} | {std} | "
                     f"{pt} | {bstd} | {beyond} |")
    blocks["best-k"] = "\n".join(lines) + "\n"
    blocks["p-rates"] = p_rate_table(rates, label=README_TASKS.get)
    return blocks


def update_readme(path: Path, blocks: dict[str, str]) -> None:
    """Replace what stands between ``<!-- accuracy:NAME -->`` and ``<!-- /accuracy:NAME -->`` in ``path``
    with each block (written atomically); a missing marker pair is an error that names it."""
    text = path.read_text()
    for name, block in blocks.items():
        start, end = f"<!-- accuracy:{name} -->\n", f"<!-- /accuracy:{name} -->"
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            raise CliptuneError(f"{path} has no '{start.strip()}' ... '{end}' pair; expected the markers around "
                                f"the {name} table (see the README's accuracy section)")
        text = text[:i + len(start)] + "\n" + block + "\n" + text[j:]  # blank lines: the table stands alone
    atomic_write_text(path, text)


def plot(out: Path, tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if any((out / "runs" / t).glob("*/seed*/history.jsonl"))]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m, color in (("bbt", "C0"), ("clip_k4", "C1")):
            curves = []
            for h in sorted((out / "runs" / t / m).glob("seed*/history.jsonl")):
                if not (h.parent / "result.json").exists():
                    continue
                ev = [json.loads(x) for x in h.read_text().splitlines() if x.strip()]
                curves.append(([e["calls"] for e in ev], [e["best_dev_metric"] for e in ev]))
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            calls = curves[0][0][:n]
            ys = np.array([c[1][:n] for c in curves])
            ax.plot(calls, ys.mean(0), color=color, label=f"{m} (n={len(curves)})")
            ax.fill_between(calls, ys.min(0), ys.max(0), color=color, alpha=0.15)
        ax.set_title(t)
        ax.set_xlabel("calls")
        ax.set_ylabel("best dev metric")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dev_vs_calls.png", dpi=90)
    plt.close(fig)


def report(out: Path, methods: list[str], tasks: list[str], wall: float | None) -> dict[str, str]:
    """Write results.json, table.md and the plot from the finished cells; return the README's tables."""
    rows = collect(out)
    comp = comparison(rows, tasks)
    prev = {}
    if (out / "results.json").exists():
        prev = json.loads((out / "results.json").read_text())
    total_wall = (prev.get("sweep_wall_seconds") or 0.0) + (wall or 0.0)
    rates = p_rates(rows, tasks)
    atomic_write_json(out / "results.json", {"cells": rows, "clip_vs_bbt": comp, "p_rates": rates,
                                              "sweep_wall_seconds": total_wall,
                                              "cell_wall_seconds_sum": sum(r["wall_seconds"] for r in rows),
                                              "command": " ".join(sys.argv)})
    md = table(rows, methods, tasks)
    md += "\n### Clip-Tuning (best K, chosen on dev) vs BBT, paired by seed\n\n"
    md += ("| task | best K (of) | on | clip | bbt | mean diff | std of diff | paired t | bbt seed std | "
           "exceeds std? |\n")
    md += "|---|---|---|---|---|---|---|---|---|---|\n"
    for c in comp:
        exceeds = "-" if c["bbt_seed_std"] is None else ("yes" if abs(c["mean_diff"]) > c["bbt_seed_std"] else "no")
        std, pt, bstd = _comp_cells(c)
        ks = "/".join(m.removeprefix("clip_k") for m in c["compared"])
        md += (f"| {c['task']} | {c['clip']} (K {ks}) | {c['on']} (seeds {','.join(map(str, c['seeds']))}) | "
               f"{c['clip_mean'] * 100:.1f} | {c['bbt_mean'] * 100:.1f} | {c['mean_diff'] * 100:+.1f} | {std} | "
               f"{pt} | {bstd} | {exceeds} |\n")
    if rates:
        md += "\n### Clip-Tuning K = 4: the dropout rate, per seed\n\n" + p_rate_table(rates)
    md += f"\nSum of cell wall times: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min over {len(rows)} cells.\n"
    atomic_write_text(out / "table.md", md)
    try:
        plot(out, tasks)
    except ImportError:
        pass
    return readme_blocks(rows, comp, rates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASK_ORDER))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--budget", type=int, default=None, help="default: the package default (8000 calls)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--import-cells", nargs="+", metavar="SRC", default=None,
                    help="copy the finished cells of other sweeps (accuracy.py --out folders or the runs.tar.gz of a "
                         "device run) into --out, add their wall time to the sweep's, rebuild the report; runs nothing")
    ap.add_argument("--readme", default=None, metavar="README.md",
                    help="also rewrite the accuracy tables between the <!-- accuracy:NAME --> markers of this file")
    ap.add_argument("--cells", default=None, metavar="TASK/METHOD/SEED,...",
                    help="run exactly these cells in this order, in place of --tasks x --methods x --seeds "
                         "(e.g. the ones a sweep has left: dbpedia/clip_k8/13,dbpedia/clip_k4_p0.2/21)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="bound one sitting: start no cell that, at the pace of the slowest cell run so far, "
                         "would end after this many minutes")
    ap.add_argument("--device", choices=DEVICES, default=None,
                    help="where cells run (default: the package's, auto = CUDA when onnxruntime-gpu finds a GPU); "
                         "table.md lists the cells scored on CUDA")
    a = ap.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    methods = [m for m in a.methods.split(",") if m]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    cells = [(t, m, s) for m in methods for s in seeds for t in tasks]
    if a.cells:
        try:
            cells = [_parse_cell(c) for c in a.cells.split(",") if c]
        except ValueError as e:
            print(f"accuracy.py: --cells: {e}", file=sys.stderr)
            return 2
        tasks = list(dict.fromkeys(t for t, _, _ in cells))
        methods = list(dict.fromkeys(m for _, m, _ in cells))
    bad = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if bad:
        print(f"accuracy.py: unknown task/method {bad}: tasks {sorted(TASKS)}, methods {list(METHODS)}",
              file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.readme and not Path(a.readme).is_file():
        print(f"accuracy.py: --readme {a.readme}: no such file; expected the README with the accuracy markers",
              file=sys.stderr)
        return 2
    if a.import_cells:
        try:
            _, wall = import_cells(out, [Path(p) for p in a.import_cells])
        except CliptuneError as e:
            print(f"accuracy.py: {e}", file=sys.stderr)
            return 2
        return _finish(a, report(out, methods, tasks, wall), out)
    t0 = time.perf_counter()
    if not a.report_only:
        # order (without --cells): the central comparison first (manual, bbt, clip K=4 over every task and
        # seed), then the rest
        slowest = 0.0  # seconds of the slowest cell run in this sitting
        for i, (t, m, s) in enumerate(cells):
            if (cell_dir(out, t, m, s) / "result.json").is_file():
                continue
            if a.max_minutes is not None and time.perf_counter() - t0 + slowest > 60 * a.max_minutes:
                print(f"[accuracy] --max-minutes {a.max_minutes:g}: the next cell would end after it "
                      f"(slowest cell so far {slowest:.0f} s); stopping with {len(cells) - i} cells left", flush=True)
                break
            tc = time.perf_counter()
            try:
                r = run_cell(out, t, m, s, a.budget, a.device)
            except CliptuneError as e:  # one line; the finished cells and this cell's checkpoint stay
                print(f"accuracy.py: {t} {m} seed {s}: {e}", file=sys.stderr)
                report(out, methods, tasks, time.perf_counter() - t0)
                return 1
            slowest = max(slowest, time.perf_counter() - tc)
            test = r["test"]["metric"] if r["test"] else None
            print(f"[accuracy] {i + 1}/{len(cells)} {t} {m} seed {s}: dev {r['dev']['metric']:.4f} test {test} "
                  f"({time.perf_counter() - tc:.0f} s)", flush=True)
            report(out, methods, tasks, None)
    return _finish(a, report(out, methods, tasks, time.perf_counter() - t0 if not a.report_only else None), out)


def _parse_cell(text: str) -> tuple[str, str, int]:
    parts = text.strip().split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"{text!r}: expected TASK/METHOD/SEED, e.g. dbpedia/clip_k8/13")
    return parts[0], parts[1], int(parts[2])


def _finish(a: argparse.Namespace, blocks: dict[str, str], out: Path) -> int:
    print((out / "table.md").read_text())
    if a.readme:
        try:
            update_readme(Path(a.readme), blocks)
        except CliptuneError as e:
            print(f"accuracy.py: {e}", file=sys.stderr)
            return 2
        print(f"[accuracy] updated the accuracy tables in {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
