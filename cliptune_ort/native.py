"""cliptune_ort's custom-op library (``native/fused_dense.cc``): build it, find it, register it.

The library holds ``ai.cliptune.FusedDense`` (``Y = act(X @ W + B [+ R])`` with the bias, the activation
and an optional residual in cuBLASLt's GEMM epilogue); the packed fp16 export uses it with
``--packed-ffn cublaslt`` / ``cublaslt_res`` (export/packing.py) to drop the separate bias + GELU, query-bias
and residual passes. Where cuDNN's and cudnn-frontend's headers are found it also holds
``ai.cliptune.RaggedAttention`` (cuDNN's fused attention on the packed rows, ``--packed-kernel cudnn``;
cuDNN is opened at run time, not linked); where nvcc is found, RaggedAttention's ``impl = 1`` runs cliptune's
own kernel for rows of at most 128 tokens (``native/short_attention.cu``, ``--packed-kernel short``). It is
compiled on the user's machine, once, by ``cliptune build-ops`` (or ``python -m cliptune_ort.native``):

- ``cuda``: the op on ONNX Runtime's CUDA provider (float16). Needs a C++ compiler, the CUDA runtime and
  cuBLAS headers and libraries (a CUDA toolkit, or the ``nvidia-cuda-runtime`` / ``nvidia-cublas`` wheels
  that PyTorch and onnxruntime-gpu install; ``crt/host_defines.h`` comes with a toolkit or
  ``nvidia-cuda-nvcc``), and ONNX Runtime's C/C++ headers.
- ``cpu``: the same op on the CPU provider (float32, a plain loop), for tests of the library's ONNX
  Runtime glue and of the graph rewrite on machines without a GPU. Needs only a compiler and the headers.

ONNX Runtime's pip wheels carry no headers. ``ort_include`` uses ``$CLIPTUNE_ORT_INCLUDE`` when set (a
folder with ``onnxruntime_cxx_api.h``), else downloads Debian's ``libonnxruntime-dev`` package (headers of
ONNX Runtime 1.21, MIT, pinned by sha256) into the cache; any runtime as new or newer accepts a library
built with them. Nothing of ONNX Runtime's is kept in this repository.

The library is loaded only by a session whose manifest asks for it (``packed_ffn: cublaslt`` or
``cublaslt_res``, ``packed_kernel: cudnn``); the runtime imports no compiler and no CUDA Python package.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from pathlib import Path

from .errors import ConfigError, ProviderError

SOURCE = Path(__file__).resolve().parent / "native" / "fused_dense.cc"
#: RaggedAttention's short-row kernel (impl 1), compiled by nvcc into the cuda variant where nvcc is found
SHORT_ATTENTION = SOURCE.parent / "short_attention.cu"
#: PackAdd's kernel (the packed first-layer input in one pass), compiled by nvcc beside it
PACK_ADD = SOURCE.parent / "pack_add.cu"
#: GPU architectures of the short-row kernel: mma.sync and cp.async need sm80; PTX of sm90 for newer cards
NVCC_ARCH = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
             "-gencode", "arch=compute_90,code=compute_90")
DOMAIN = "ai.cliptune"
OP = "FusedDense"
VARIANTS = ("cpu", "cuda")
#: Debian's libonnxruntime-dev (trixie): ONNX Runtime 1.21.0's headers; the license is in the package
ORT_HEADERS = {
    "version": "1.21.0",
    "url": "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
    "sha256": "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08",
}


class NativeOpsError(ConfigError):
    """The custom-op library cannot be built, found or loaded."""


def lib_name(variant: str) -> str:
    if variant not in VARIANTS:
        raise NativeOpsError(f"ops variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return f"libcliptune_ops_{variant}.so"


def ops_dir() -> Path:
    """Where built libraries go: ``$CLIPTUNE_OPS_DIR``, else ``<cache>/ops``."""
    from .models import cache_dir

    env = os.environ.get("CLIPTUNE_OPS_DIR")
    return Path(env) if env else cache_dir() / "ops"


def _extract_deb(data: bytes, dest: Path, keep: tuple[str, ...]) -> None:
    """Members of a .deb (an ar archive holding data.tar.*) under the ``keep`` prefixes, into ``dest``."""
    import io
    import tarfile

    if not data.startswith(b"!<arch>\n"):
        raise NativeOpsError("the downloaded headers package is not a .deb archive")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                members = [m for m in tar.getmembers()
                           if m.isfile() and m.name.lstrip("./").startswith(keep)]
                for m in members:
                    m.name = m.name.lstrip("./")
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(dest, members=members, **kw)
            return
    raise NativeOpsError("the downloaded headers package has no data archive")


def ort_include(download: bool = True) -> Path:
    """A folder holding ONNX Runtime's ``onnxruntime_cxx_api.h`` (see the module docstring)."""
    env = os.environ.get("CLIPTUNE_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_cxx_api.h").is_file():
            raise NativeOpsError(f"CLIPTUNE_ORT_INCLUDE={env} has no onnxruntime_cxx_api.h: point it at ONNX "
                                 "Runtime's include folder")
        return Path(env)
    from .models import cache_dir

    root = cache_dir() / f"ort-headers-{ORT_HEADERS['version']}"
    inc = root / "usr" / "include" / "onnxruntime"
    if (inc / "onnxruntime_cxx_api.h").is_file():
        return inc
    import hashlib
    import tempfile
    import urllib.request

    if not download:
        raise NativeOpsError(f"ONNX Runtime's headers are not in {inc}: run `cliptune build-ops` once online, or set "
                             "CLIPTUNE_ORT_INCLUDE to ONNX Runtime's include folder")
    try:
        with urllib.request.urlopen(ORT_HEADERS["url"], timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise NativeOpsError(f"cannot download ONNX Runtime's headers from {ORT_HEADERS['url']} ({e}): set "
                             "CLIPTUNE_ORT_INCLUDE to ONNX Runtime's include folder") from None
    got = hashlib.sha256(data).hexdigest()
    if got != ORT_HEADERS["sha256"]:
        raise NativeOpsError(f"{ORT_HEADERS['url']} has sha256 {got}, expected {ORT_HEADERS['sha256']}: not the "
                             "pinned package; set CLIPTUNE_ORT_INCLUDE to ONNX Runtime's include folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ort-headers.", dir=root.parent))
    try:
        _extract_deb(data, tmp, ("usr/include/onnxruntime/", "usr/share/doc/"))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return inc


def _nvidia_roots() -> list[Path]:
    """Folders of the CUDA toolkit and of NVIDIA's pip packages (``site-packages/nvidia/...``)."""
    roots = [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if p]
    for sp in sys.path:
        base = Path(sp or ".") / "nvidia"
        if base.is_dir():
            roots += sorted(p for p in base.iterdir() if p.is_dir())
    return roots


def _find(roots: list[Path], subdirs: tuple[str, ...], pattern: str) -> Path | None:
    for r in roots:
        for s in subdirs:
            if glob.glob(str(r / s / pattern)):
                return r / s
    return None


#: the libraries the cuda variant links: file stem -> where it comes from
CUDA_LIBS = {"libcublasLt": "nvidia-cublas", "libcudart": "nvidia-cuda-runtime"}


def cuda_dirs(include_dirs=(), lib_dirs=()) -> tuple[list[Path], dict[str, Path]]:
    """Include folders and the folder of each of :data:`CUDA_LIBS` for the cuda variant: the given ones first,
    then the toolkit and pip packages."""
    roots = _nvidia_roots()
    inc, given = [Path(p) for p in include_dirs], [Path(p) for p in lib_dirs]
    need_inc = {"cublasLt.h": "cuBLAS (nvidia-cublas)", "cuda_runtime_api.h": "the CUDA runtime (nvidia-cuda-runtime)",
                "crt/host_defines.h": "a CUDA toolkit or nvidia-cuda-nvcc"}
    for header, what in need_inc.items():
        if any((d / header).is_file() for d in inc):
            continue
        found = _find(roots, ("include",), header)
        if found is None:
            raise NativeOpsError(f"{header} not found (it comes with {what}): install it, or pass --include DIR")
        inc.append(found)
    libs = {}
    for stem, what in CUDA_LIBS.items():
        found = next((d for d in given if glob.glob(str(d / f"{stem}.so*"))), None) or _find(
            roots, ("lib64", "lib"), f"{stem}.so*")
        if found is None:
            raise NativeOpsError(f"{stem}.so not found (it comes with {what} or a CUDA toolkit): install it, or pass "
                                 "--lib DIR")
        libs[stem] = found
    return list(dict.fromkeys(inc)), libs


def cudnn_dirs(include_dirs=()) -> list[Path] | None:
    """Include folders of cuDNN's ``cudnn.h`` and cudnn-frontend's header-only ``cudnn_frontend.h`` (the
    ``nvidia-cudnn-cu13`` and ``nvidia-cudnn-frontend`` wheels; frontend 1.14 needs no NVRTC headers) for
    RaggedAttention in the cuda variant, or None where one is missing: the library is then built without that
    op (``cliptune_ops_list``)."""
    roots = _nvidia_roots()
    inc = []
    for header in ("cudnn.h", "cudnn_frontend.h"):
        found = next((Path(d) for d in include_dirs if (Path(d) / header).is_file()), None) or _find(
            roots, ("include",), header)
        if found is None:
            return None
        inc.append(found)
    return inc


def _soname(lib_dir: Path, stem: str) -> str:
    """``-l:libX.so.N`` for the versioned file in ``lib_dir`` (pip wheels ship no unversioned link)."""
    names = sorted(glob.glob(str(lib_dir / f"{stem}.so.*")), key=len)
    return f"-l:{Path(names[0]).name}" if names else f"-l{stem[3:]}"


def build(variant: str = "cpu", out_dir: str | os.PathLike | None = None, include_dirs=(), lib_dirs=(),
          cxx: str | None = None) -> Path:
    """Compile the library for ``variant``; returns its path (written atomically)."""
    name = lib_name(variant)
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise NativeOpsError(f"C++ compiler {cxx!r} not found: install g++ (or set CXX)")
    out = Path(out_dir) if out_dir else ops_dir()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", f"-I{ort_include()}"]
    libs: list[str] = []
    if variant == "cuda":
        inc, lib_of = cuda_dirs(include_dirs, lib_dirs)
        cmd += ["-DCLIPTUNE_CUDA", *(f"-I{d}" for d in inc)]
        # the CUDA libraries are found at run time through the process (ONNX Runtime's CUDA provider and
        # PyTorch load them) or the loader path: no rpath into a build machine's folders
        libs = [*(f"-L{d}" for d in dict.fromkeys(lib_of.values())),
                *(_soname(d, stem) for stem, d in lib_of.items())]
        dnn = cudnn_dirs(include_dirs)
        if dnn is not None:  # RaggedAttention (cuDNN's fused attention on packed rows) too; cuDNN is opened at run
            cmd += ["-DCLIPTUNE_CUDNN", *(f"-I{d}" for d in dnn)]  # time (dlopen), not linked
            libs.append("-ldl")
    tmp = out / f".{name}.{os.getpid()}.tmp"
    objs: list[str] = []
    try:
        nvcc = find_nvcc() if variant == "cuda" else None
        if nvcc is not None:  # RaggedAttention's short-row kernel (impl 1) and PackAdd's kernel
            for src, flag in ((SHORT_ATTENTION, "-DCLIPTUNE_SHORT_ATTN"), (PACK_ADD, "-DCLIPTUNE_PACK_ADD")):
                obj = out / f".{src.stem}.{os.getpid()}.o"
                objs.append(str(obj))
                ncmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *NVCC_ARCH, *(f"-I{d}" for d in inc),
                        "-c", str(src), "-o", str(obj)]
                _compile(ncmd, name)
                cmd.append(flag)
        _compile([*cmd, str(SOURCE), *objs, "-o", str(tmp), *libs], name)
        os.replace(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)
        for o in objs:
            Path(o).unlink(missing_ok=True)
    return out / name


def find_nvcc() -> str | None:
    """nvcc for the short-row attention kernel: ``$NVCC``, else on PATH, else ``<CUDA_HOME>/bin/nvcc``."""
    env = os.environ.get("NVCC")
    if env:
        return env if shutil.which(env) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(Path(root) / "bin" / "nvcc", os.X_OK):
            return str(Path(root) / "bin" / "nvcc")
    return None


def _compile(cmd: list[str], name: str) -> None:
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        err = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[-300:])
        raise NativeOpsError(f"building {name} failed ({err.strip()[:300]}); command: {' '.join(cmd)}")


def library_path(variant: str) -> Path:
    """The built library: ``$CLIPTUNE_OPS_LIB`` (a file) if set, else ``ops_dir()/libcliptune_ops_<variant>.so``."""
    env = os.environ.get("CLIPTUNE_OPS_LIB")
    path = Path(env) if env else ops_dir() / lib_name(variant)
    if not path.is_file():
        raise NativeOpsError(f"the {variant} custom-op library is not built ({path} missing): run "
                             f"`cliptune build-ops --variant {variant}` (needs g++; see cliptune_ort/native.py)")
    import ctypes

    got = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL) if variant == "cpu" else None
    if got is not None:
        got.cliptune_ops_variant.restype = ctypes.c_char_p
        if got.cliptune_ops_variant().decode() != variant:
            raise NativeOpsError(f"{path} is not the {variant} build: rebuild with `cliptune build-ops --variant "
                                 f"{variant}`")
    return path


def register(so, variant: str) -> Path:
    """Register the library with ``so`` (an ``onnxruntime.SessionOptions``); one-line errors when it cannot load."""
    path = library_path(variant)
    try:
        so.register_custom_ops_library(str(path))
    except Exception as e:  # noqa: BLE001 - ORT raises its own types; the loader names the missing library
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hint = (" (the CUDA libraries load with onnxruntime-gpu's CUDA provider: call onnxruntime.preload_dlls() "
                "or import torch first, or put their folder on LD_LIBRARY_PATH)" if variant == "cuda" else "")
        raise ProviderError(f"cannot load the custom-op library {path}: {msg}{hint}") from None
    return path


def add_build_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variant", choices=VARIANTS, default="cuda", help="cuda (the GPU op) or cpu (tests)")
    ap.add_argument("--out", help="output folder (default: $CLIPTUNE_OPS_DIR or <cache>/ops)")
    ap.add_argument("--include", action="append", default=[], help="extra include folder (repeatable)")
    ap.add_argument("--lib", action="append", default=[], help="extra library folder (repeatable)")


def run_build(a) -> int:
    path = build(a.variant, a.out, a.include, a.lib)
    print(f"built {path}")
    if a.variant == "cuda":
        nvcc = find_nvcc()
        print(f"RaggedAttention's short-row kernel (--packed-kernel short) and PackAdd (--packed-front fused): "
              f"{'built with ' + nvcc if nvcc else 'not built (no nvcc: set NVCC or CUDA_HOME)'}")
    return 0


if __name__ == "__main__":  # python -m cliptune_ort.native ARGS = cliptune build-ops ARGS
    from .cli import main

    sys.exit(main(["build-ops", *sys.argv[1:]]))
