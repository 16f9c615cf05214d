"""Make a device run's results folder fit what the lent GPU machine hands back.

    python benchmarks/pack_out.py "$OUT"        # gpu_run.sh calls this after the script

The device tool brings back at most 8 files from $OUT, and none more than two folders down
($OUT/a/b/file comes back, $OUT/a/b/c/file does not). benchmarks/accuracy.py writes its cells to
$OUT/runs/<task>/<method>/seed<N>/ (four folders down, six files a cell), so without this nothing of a
GPU accuracy sweep would come back but its table. Each top-level folder that holds a file too deep is
packed into $OUT/<folder>.tar.gz (written under a temporary name, then renamed) and removed; if more
than 8 files are still left, the remaining folders are packed too. Unfinished cells (a checkpoint, no
result.json) are packed as well; `accuracy.py --import-cells` takes only the finished ones.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FOLDERS = 2  # folders between $OUT and a file that still comes back
MAX_FILES = 8


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _depth(out: Path, f: Path) -> int:
    return len(f.relative_to(out).parts) - 1


def _pack(out: Path, folder: Path) -> Path:
    dest = out / f"{folder.name}.tar.gz"
    tmp = out / f".{folder.name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    os.replace(tmp, dest)
    shutil.rmtree(folder)
    return dest


def pack(out: Path, max_folders: int = MAX_FOLDERS, max_files: int = MAX_FILES) -> list[Path]:
    """Pack the folders of ``out`` that would not come back; return the archives written."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"pack_out: {out} is not a folder (expected the run's $OUT)")
    if out.resolve().is_relative_to(ROOT):  # it deletes what it packs: never the repository's own results
        raise ValueError(f"pack_out: {out} is inside the repository (expected the device's $OUT, outside it)")
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    packed = [_pack(out, d) for d in folders if any(_depth(out, f) > max_folders for f in _files(d))]
    if len(_files(out)) > max_files:
        packed += [_pack(out, d) for d in sorted(p for p in out.iterdir() if p.is_dir())]
    return packed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/pack_out.py OUT (expected the results folder to pack)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    try:
        packed = pack(out)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for p in packed:
        print(f"[pack_out] packed {p.name} ({p.stat().st_size / 1e6:.2f} MB)")
    left = _files(out)
    if len(left) > MAX_FILES:
        print(f"[pack_out] WARNING: {len(left)} files in {out}, only {MAX_FILES} come back", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
