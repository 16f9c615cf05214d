"""ONNX Runtime sessions: made in one place, providers checked, weights shared.

Every session in the package is created by :func:`make_session`, which resolves the execution
provider, then *checks that the asked-for provider really runs* (ORT falls back to the CPU
silently), shares the weights of the model directory across sessions and sets the options measured
to matter on small machines (no prepacking when weights are shared, no thread spinning when
several sessions live).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ModelDirError, ProviderError
from .manifest import Manifest

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when the CUDA provider is available, else 'cpu'."""
    if device not in DEVICES:
        raise ProviderError(f"device {device!r} is not one of {', '.join(DEVICES)}: pass --device auto|cpu|cuda")
    if device == "auto":
        return "cuda" if CUDA in available_providers() else "cpu"
    if device == "cuda" and CUDA not in available_providers():
        raise ProviderError(
            "device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available_providers())}): pip install onnxruntime-gpu, or pass --device cpu"
        )
    return device


def graph_weight_names(manifest: Manifest, graphs: list[int]) -> set[str]:
    """Names of the shared tensors (``weights.bin``) that ``graphs`` use: each graph file names its
    external initializers, content-addressed as ``w_<24 hex digits>`` by the exporter."""
    import re

    table = {t["name"] for t in manifest.data["weights"]["tensors"]}
    used: set[str] = set()
    for g in graphs:
        found = re.findall(rb"w_[0-9a-f]{24}", manifest.graph_path(g).read_bytes())
        used |= {n.decode() for n in found} & table
    return used


def env_flag(name: str, value: bool | None = None) -> bool:
    """``value`` when given, else the environment variable ``name``: '1' on, '0' or unset off."""
    if value is not None:
        return bool(value)
    env = os.environ.get(name, "").strip()
    if env not in ("", "0", "1"):
        from .errors import ConfigError

        raise ConfigError(f"{name}={env!r}: expected 1 (on) or 0 (off); unset it for the default (off)")
    return env == "1"


class SharedWeights:
    """The model directory's ``weights.bin``, memory-mapped once and handed to every session.

    Each tensor listed in the manifest becomes an OrtValue over the mapped file (no copy); sessions
    receive them through ``SessionOptions.add_initializer``. ONNX Runtime uses such a tensor in place
    only where the session plans it on the tensor's device: on the CPU provider the K+1 sessions hold one
    copy; a CUDA session copies each tensor it places on the GPU into memory of its own.

    ``device='cuda'``: the tensors that ``graphs`` use are copied to the GPU once, as device OrtValues,
    which every CUDA session then uses in place (one device copy for the K+1 sessions, no upload per
    session). Opt-in (``Engine(device_weights=True)`` or ``CLIPTUNE_DEVICE_WEIGHTS=1``): card run 8 found that
    onnxruntime 1.31.1's ``add_initializer`` refuses device OrtValues it allocated itself, which
    :func:`make_session` turns into a one-line ConfigError (benchmarks/session_open.py measures it where a
    runtime takes them, and checks the losses are the same).
    """

    def __init__(self, manifest: Manifest, device: str = "cpu", graphs: list[int] | None = None):
        table = manifest.data["weights"]["tensors"]
        path = manifest.weights_path
        size = path.stat().st_size
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        wanted = graph_weight_names(manifest, graphs) if graphs is not None else None
        for t in table:
            end = int(t["offset"]) + int(t["length"])
            if end > size:
                raise ModelDirError(f"{path} is truncated ({size} bytes, tensor {t['name']} ends at {end}): re-export")
            arr = self._map[int(t["offset"]):end].view(np.dtype(t["dtype"])).reshape(t["shape"])
            self.arrays[t["name"]] = arr
            if wanted is not None and t["name"] not in wanted:
                continue
            if device == "cpu":
                self.values[t["name"]] = ort.OrtValue.ortvalue_from_numpy(arr)
            else:  # one host -> device copy here, none per session
                self.values[t["name"]] = ort.OrtValue.ortvalue_from_numpy(arr, device, 0)


#: ONNX Runtime's attention kernels on CUDA (the CUDA provider's ``sdpa_kernel`` bit mask, AttentionBackend in
#: its attention_common.h); 16 (MATH, the unfused kernel) is kept as the fallback for nodes the kernel cannot run
ATTENTION_KERNELS = {"auto": 0, "flash": 1, "efficient": 2, "cudnn": 8}


def attention_kernel(value: str | None = None) -> str:
    """``value`` when given, else ``CLIPTUNE_ATTENTION`` (unset: 'auto', ONNX Runtime's own choice), checked."""
    name = (value if value is not None else os.environ.get("CLIPTUNE_ATTENTION", "")).strip() or "auto"
    if name not in ATTENTION_KERNELS:
        from .errors import ConfigError

        raise ConfigError(f"attention kernel {name!r} (CLIPTUNE_ATTENTION) is not one of "
                          f"{', '.join(ATTENTION_KERNELS)}: pick one, or unset it for ONNX Runtime's choice")
    return name


@dataclass
class SessionSpec:
    """How to make sessions: every runtime knob in one place."""

    device: str = "cpu"  # resolved device: 'cpu' or 'cuda'
    threads: int = 0  # intra-op threads; 0 = number of CPU cores
    n_live: int = 1  # sessions alive at once; > 1 turns thread spinning off
    optimization: str = "all"  # ORT graph optimisation level: disable|basic|extended|all
    cuda_options: dict = field(default_factory=dict)  # extra CUDA provider options
    cuda_graph: bool = False  # capture CUDA graphs (fixed shapes and IOBinding only)
    cpu_arena: bool = False  # ORT CPU memory arena (keeps peak allocations; off measured leaner)
    disabled_optimizers: tuple[str, ...] = ()  # ORT graph optimizers to skip (see engine.disabled_optimizers)
    ops_library: str | None = None  # custom-op library variant the graphs need ('cuda' | 'cpu'; cliptune_ort.native)
    profile_prefix: str | None = None  # ORT's profiler on, files named after this (benchmarks/session_open.py)
    attention: str = "auto"  # CUDA attention kernel (ATTENTION_KERNELS); 'auto' leaves the choice to ORT


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def provider_list(spec: SessionSpec) -> list:
    """The ``providers`` argument of a session made after ``spec`` (CUDA with its options, then the CPU)."""
    if spec.device != "cuda":
        return [CPU]
    opts = {"device_id": 0, **spec.cuda_options}
    if spec.cuda_graph:
        opts["enable_cuda_graph"] = "1"
    bits = ATTENTION_KERNELS[attention_kernel(spec.attention)]
    if bits:  # the unfused kernel stays as the fallback for a node the chosen kernel cannot run
        opts["sdpa_kernel"] = str(bits | 16)
    return [(CUDA, opts), CPU]


def make_session(path: str | Path, spec: SessionSpec, shared: SharedWeights | None = None) -> ort.InferenceSession:
    """Create one session for ``path`` following ``spec``; raise if the provider did not take."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = _LEVELS[spec.optimization]
    so.intra_op_num_threads = spec.threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if spec.device == "cpu" and not spec.cpu_arena:
        # varying shapes (buckets, dev/test chunks) make the arena keep every peak: measured 618 -> 357 MB peak RSS for an SST-2 run, same speed
        so.enable_cpu_mem_arena = False
    if spec.profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = spec.profile_prefix
    if spec.n_live > 1:
        # several sessions called in turn on few cores: spinning pools fight (142 ms vs 37 ms measured)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared is not None:
        # otherwise each session keeps its own prepacked copy of every weight (~330 MB for base)
        so.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in shared.values.items():
            try:
                so.add_initializer(name, value)
            except RuntimeError as e:
                if value.device_name().lower() == "cpu":
                    raise
                # onnxruntime 1.31.1 refuses device OrtValues it allocated itself (card run 8: "Buffer containing
                # the initializer must be owned by the user")
                from .errors import ConfigError

                msg = str(e).strip().splitlines()[-1].split(" : ")[-1][:200]
                raise ConfigError(f"CLIPTUNE_DEVICE_WEIGHTS=1: this onnxruntime {ort.__version__} does not take "
                                  f"weights in device memory as initializers ({msg}); unset CLIPTUNE_DEVICE_WEIGHTS "
                                  "(the default: host weights)") from None
    if spec.ops_library:
        from . import native

        native.register(so, spec.ops_library)
    providers = provider_list(spec)
    try:
        kw = {"disabled_optimizers": list(spec.disabled_optimizers)} if spec.disabled_optimizers else {}
        sess = ort.InferenceSession(str(path), so, providers=providers, **kw)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing = re.search(r"ai\.cliptune:(\w+)\(-?\d+\) is not a registered function/op", msg)
        if spec.ops_library and missing:  # a library built before that op existed, or without nvcc
            raise ProviderError(f"the custom-op library registered for {path} has no {missing.group(1)} op (built "
                                f"before it existed, or without nvcc): rebuild it with `cliptune build-ops --variant "
                                f"{spec.ops_library}`") from None
        ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", msg)
        if ir:  # written by an onnx newer than this onnxruntime (card run 10: onnx 1.23's IR 14, ORT 1.31.1's 13)
            raise ModelDirError(f"{path} is ONNX IR version {ir.group(1)}; onnxruntime {ort.__version__} reads up to "
                                f"{ir.group(2)}: upgrade onnxruntime, or re-export with an onnx as old as it") from None
        # ORT's own text leads with a source location and a C++ signature: keep the cause at its end
        msg = re.sub(r"/\S+\.cc:\d+ [\w:]+\(.*?\) ", "", msg)
        raise ModelDirError(f"ONNX Runtime cannot load {path} ({msg[:300]}): the file is damaged or not a "
                            "cliptune graph; re-export the model dir") from None
    # the session reads the shared weights from the memory map without owning it: keep it alive
    sess._cliptune_shared = shared
    want = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    got = sess.get_providers()[0]
    if got != want:
        raise ProviderError(f"asked for {want} but ONNX Runtime runs {path} on {got}: check the CUDA/cuDNN "
                            "libraries (onnxruntime.preload_dlls()) or pass --device cpu")
    return sess


def check_contract(sess: ort.InferenceSession, path: str | Path, hidden: int, extra: tuple[str, ...] = (),
                   prompt_dtype: str = "float32") -> None:
    """Refuse a graph whose inputs/outputs are not the contract's (e.g. an unrelated ONNX file);
    ``extra``: further inputs the manifest's layout adds (packed_host graphs); ``prompt_dtype``: the type of
    prompt_embeds the manifest records."""
    want = {"input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids", *extra}
    got = {i.name for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    if got != want or outs != ["logits"]:
        raise ModelDirError(f"{path} has inputs {sorted(got)} and outputs {outs}; expected inputs "
                            f"{sorted(want)} and output ['logits']: not a cliptune graph, re-export")
    pe = next(i for i in sess.get_inputs() if i.name == "prompt_embeds")
    if isinstance(pe.shape[2], int) and pe.shape[2] != hidden:
        raise ModelDirError(f"{path} takes prompt_embeds of hidden size {pe.shape[2]}, the manifest says {hidden}: "
                            "graph from another model; re-export")
    want_type = {"float32": "tensor(float)", "float16": "tensor(float16)"}[prompt_dtype]
    if pe.type != want_type:
        raise ModelDirError(f"{path} takes prompt_embeds as {pe.type}, the manifest says {prompt_dtype} "
                            f"({want_type}): a graph from another export; re-export")


def warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags from Linux's /proc/cpuinfo (or ``cpuinfo``, its text), None where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            return set(value.split())
    return None


def int8_saturates(weights: str | None, flags: set[str] | None = None) -> bool:
    """True where an int8 export with full-range int8 weights (manifest int8_weights "int8") meets ONNX Runtime's
    AVX2 / AVX-512 uint8 x int8 kernels: an x86 CPU without VNNI, whose 16-bit pair sums overflow
    (manifest.INT8_WEIGHTS). False for the other formats, on VNNI / AMX CPUs, on ARM and where the flags are
    unknown."""
    if weights != "int8":
        return False
    flags = cpu_flags() if flags is None else flags
    if not flags or "avx2" not in flags:
        return False
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def int8_saturation_warning(weights: str | None, what: str) -> None:
    """One warning when :func:`int8_saturates` on this CPU, saying how to fix it."""
    if int8_saturates(weights):
        warn(f"{what} has full-range int8 weights, which ONNX Runtime's int8 kernels saturate on this CPU (AVX2 "
             "without VNNI; a deployed SST-2 classifier agreed with fp32 on 65% of the test set): re-export "
             "(or redeploy) with --int8-weights int7 (the default) or uint8")
