"""Atomic, crash-safe file writes and hashing.

Every file the package writes for later reading (manifests, checkpoints, results, histories) goes
through :func:`atomic_write_bytes`: write to a temporary file in the same directory, flush and
fsync it, rename it over the target, then fsync the directory. A reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (floats keep full precision: repr round-trips)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync (JSONL histories).

    A process killed mid-append leaves a torn last line (no trailing newline); it is cut off here
    before the new line is written, so a torn line never glues onto a good one, and
    :func:`read_jsonl_lines` ignores it.
    """
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)
        f.write((line.rstrip("\n") + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_lines(path: str | os.PathLike) -> list[Any]:
    """The JSON values of a JSONL file this package appended to (e.g. history.jsonl).

    A torn last line (no trailing newline: the writer was killed mid-append) is ignored; a bad line
    anywhere else raises ValueError naming the file and line, since it cannot come from a kill.
    """
    complete = Path(path).read_bytes().split(b"\n")[:-1]  # the last piece is b"" or a torn line
    out = []
    for i, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{i}: expected one JSON value per line, found a corrupt line ({e})") from None
    return out


#: a cached hash is trusted only for a file whose last change (ctime) is this much older than the hash
RACY_NS = 100_000_000


def file_stamp(path: str | os.PathLike) -> tuple[int, ...] | None:
    """(device, inode, size, mtime, ctime) of ``path``, None when it cannot be stat'ed: equal stamps mean
    the file was neither written nor replaced in between."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _file_id(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_files_cached(paths: list[Path], cache_file: Path | None, rehash: bool = False) -> list[str]:
    """sha256 of each of ``paths``, skipping the read of a file whose size, mtime and ctime equal those
    recorded in ``cache_file`` for its (device, inode) when it was last hashed (git's index does the
    same). Writing a file changes its mtime and ctime and replacing it its inode, so only a change below
    the file system (bit rot) goes unseen; ``rehash`` reads every file again (and records it). Keyed by
    inode, an entry survives renaming the folder (an export hashes its files, then moves them into
    place). ``cache_file`` (JSON, written atomically; None = no cache) is best effort: a missing, corrupt
    or read-only one just means hashing.

    File timestamps tick coarsely (a few ms), so a file changed just before it was hashed could change
    again unseen within the same tick: an entry is trusted only when the file's ctime is at least
    ``RACY_NS`` older than the hash (git's "racy" rule); otherwise the file is read again."""
    entries: dict[str, Any] = {}
    if cache_file is not None:
        try:
            loaded = json.loads(Path(cache_file).read_text(encoding="utf-8"))
            entries = loaded.get("files", {}) if isinstance(loaded, dict) else {}
            entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError, RecursionError):
            entries = {}
    out, changed = [], False
    for path in paths:
        st = os.stat(path)
        fid = _file_id(st)
        hit = entries.get(fid)
        if (not rehash and isinstance(hit, dict) and hit.get("stat") == _stat_key(st)
                and isinstance(hit.get("sha256"), str) and isinstance(hit.get("hashed_ns"), int)
                and hit["hashed_ns"] - st.st_ctime_ns >= RACY_NS):
            out.append(hit["sha256"])
            continue
        hashed_ns = time.time_ns()
        sha = sha256_file(path)
        if _stat_key(os.stat(path)) == _stat_key(st):  # not written to while it was read
            entries.pop(fid, None)  # re-inserted last: the oldest entries are the first dropped
            entries[fid] = {"path": str(Path(path).resolve()), "stat": _stat_key(st), "sha256": sha,
                            "hashed_ns": hashed_ns}
            changed = True
        out.append(sha)
    if cache_file is not None and changed:
        if len(entries) > 512:  # forget files that are gone, then the oldest entries
            entries = {k: v for k, v in entries.items() if isinstance(v, dict) and os.path.exists(str(v.get("path")))}
            entries = dict(list(entries.items())[-512:])
        try:
            atomic_write_json(cache_file, {"format": "cliptune-hash-cache", "files": entries})
        except OSError:
            pass
    return out


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write_bytes` leaves when killed (``.NAME.*.tmp``)."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
