"""The verified-hash cache: a model dir's files are hashed once, not on every run's start.

A roberta-large fp16 K = 4 export pins 1.6 GiB; hashing it is about 1 s of each tune's start (0.94 s for the
1.25 GiB fp32 K = 1 export on the 2-core machine).
The cache must never hide a change: in-place writes (same size, even with the old mtime put back),
replaced files, and files changed just before they were hashed are read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cliptune_ort import fileio
from cliptune_ort.errors import ConfigError, IntegrityError
from cliptune_ort.fileio import RACY_NS, sha256_files_cached
from cliptune_ort.manifest import load_manifest

from .conftest import needs_export


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names of the files sha256_file really read."""
    seen: list[str] = []
    real = fileio.sha256_file

    def counting(path, *a, **kw):
        seen.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(fileio, "sha256_file", counting)
    return seen


def _old_file(path: Path, data: bytes) -> Path:
    """A file written, then aged past the racy window (its ctime is older than any later hash)."""
    path.write_bytes(data)
    time.sleep(RACY_NS / 1e9 + 0.02)
    return path


def test_second_hash_reads_nothing_and_agrees(tmp_path, reads):
    files = [_old_file(tmp_path / f"f{i}.bin", os.urandom(1000 + i)) for i in range(3)]
    cache = tmp_path / "cache.json"
    want = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert sha256_files_cached(files, cache) == want
    assert reads == ["f0.bin", "f1.bin", "f2.bin"]
    reads.clear()
    assert sha256_files_cached(files, cache) == want
    assert reads == []
    assert sha256_files_cached(files, cache, rehash=True) == want  # CLIPTUNE_VERIFY=full's path
    assert reads == ["f0.bin", "f1.bin", "f2.bin"]


@pytest.mark.parametrize("change", ["same_size_old_mtime", "append", "replace"])
def test_a_changed_file_is_read_again(tmp_path, reads, change):
    f = _old_file(tmp_path / "w.bin", b"a" * 4096)
    cache = tmp_path / "cache.json"
    sha256_files_cached([f], cache)
    st = f.stat()
    if change == "same_size_old_mtime":  # flip a byte in place, then put the old mtime back
        with open(f, "r+b") as fh:
            fh.seek(100)
            fh.write(b"b")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "append":
        with open(f, "ab") as fh:
            fh.write(b"x")
    else:  # another file renamed over it (new inode), the old mtime put back
        other = tmp_path / "other.bin"
        other.write_bytes(b"c" * 4096)
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, f)
    reads.clear()
    got = sha256_files_cached([f], cache)
    assert reads == ["w.bin"]
    assert got == [hashlib.sha256(f.read_bytes()).hexdigest()]


def test_a_file_changed_just_before_its_hash_is_not_trusted(tmp_path, reads):
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"new")  # ctime now: a same-tick change after the hash would keep every stat field
    cache = tmp_path / "cache.json"
    sha256_files_cached([f], cache)
    reads.clear()
    sha256_files_cached([f], cache)
    assert reads == ["fresh.bin"]  # racy: read again (and recorded, now well after its last change)
    time.sleep(RACY_NS / 1e9 + 0.02)
    sha256_files_cached([f], cache)
    reads.clear()
    sha256_files_cached([f], cache)
    assert reads == []


def test_entries_survive_renaming_the_folder(tmp_path, reads):
    d = tmp_path / "tmp_export"
    d.mkdir()
    f = _old_file(d / "weights.bin", b"w" * 100)
    cache = tmp_path / "cache.json"
    sha256_files_cached([f], cache, rehash=True)  # what the exporter's pin_sha256 does before moving the dir
    os.replace(d, tmp_path / "export")
    reads.clear()
    got = sha256_files_cached([tmp_path / "export" / "weights.bin"], cache)
    assert reads == [] and got == [hashlib.sha256(b"w" * 100).hexdigest()]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"files": 3}', '{"files": {"1:2": "x"}}'])
def test_a_corrupt_cache_only_means_hashing(tmp_path, reads, content):
    f = _old_file(tmp_path / "a.bin", b"abc")
    cache = tmp_path / "cache.json"
    cache.write_text(content)
    assert sha256_files_cached([f], cache) == [hashlib.sha256(b"abc").hexdigest()]
    assert reads == ["a.bin"]
    assert json.loads(cache.read_text())["format"] == "cliptune-hash-cache"


def test_an_unwritable_cache_only_means_hashing(tmp_path, reads):
    f = _old_file(tmp_path / "a.bin", b"abc")
    cache = tmp_path / "no_such_dir_parent_is_a_file"
    cache.write_text("")
    got = sha256_files_cached([f], cache / "cache.json")  # its parent is a file: the write fails
    assert got == [hashlib.sha256(b"abc").hexdigest()]


@needs_export
def test_load_manifest_hashes_once_and_still_refuses_tampering(splade_dir, tmp_path, reads, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(splade_dir, d)
    time.sleep(RACY_NS / 1e9 + 0.02)
    load_manifest(d)
    assert "weights.bin" in reads
    reads.clear()
    load_manifest(d)
    assert reads == []
    monkeypatch.setenv("CLIPTUNE_VERIFY", "full")
    load_manifest(d)
    assert "weights.bin" in reads
    monkeypatch.setenv("CLIPTUNE_VERIFY", "sometimes")
    with pytest.raises(ConfigError, match="CLIPTUNE_VERIFY='sometimes': expected one of cached, full"):
        load_manifest(d)
    monkeypatch.delenv("CLIPTUNE_VERIFY")
    w = d / "weights.bin"
    st = w.stat()
    with open(w, "r+b") as fh:  # same size, old mtime put back
        fh.seek(st.st_size // 2)
        b = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([b[0] ^ 1]))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="weights.bin has sha256"):
        load_manifest(d)
