"""The forward engine: K+1 sessions over one model directory, fed fixed token batches.

``Engine.logits(graph, prompts, batch)`` returns verbalizer logits [pop, n, labels] for the
candidate prompts [pop, L, hidden] on a fixed :class:`FixedBatch` (tokenised once, split into
length buckets once). Candidates are sent ``cands_per_call`` at a time: one per call on the CPU
(stacking is slower per candidate there), all stacked on CUDA.

Where a run's candidates are stacked and bound (CUDA), ``Engine.project`` computes the prompts from
the candidates z on the device (the projection graph of ``assets/projection``) into one buffer that
every thinned graph reads: no numpy projection, no host -> device copy of the prompts per graph.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoding import Encoded, buckets, padded_fraction
from .errors import ConfigError, IntegrityError, ModelDirError, ProviderError
from .manifest import SPLIT_KERNELS, Manifest
from .sessions import (
    SessionSpec,
    SharedWeights,
    attention_kernel,
    check_contract,
    env_flag,
    int8_saturation_warning,
    make_session,
    resolve_device,
    warn,
)

_BATCH_IDS = itertools.count(1)
#: the prompt projection graphs (built by export/projection.py; no weights, the same for every model)
PROJECTION_DIR = Path(__file__).resolve().parent / "assets" / "projection"
#: extra inputs of "packed_host" graphs (export/packing.py HOST_INPUTS)
PACKING_INPUTS = ("packed_token_index", "packed_token_offset", "packed_cu_seqlens")
#: float32 -> float16 on the host through ONNX Runtime's CPU Cast (built by export/projection.py)
CAST_PATH = PROJECTION_DIR / "cast_fp16.onnx"
#: arrays below this many elements are cast by numpy (a session run costs more than the cast there)
CAST_MIN = 1 << 14
_cast = {"session": None, "failed": False}
_cast_lock = threading.Lock()


def host_cast(a, dtype) -> np.ndarray:
    """``np.ascontiguousarray(a, dtype=dtype)``, the same bits, faster for float32 -> float16 arrays of
    :data:`CAST_MIN` elements or more: ONNX Runtime's CPU Cast (MLAS's vectorised conversion) where numpy
    converts one element at a time (20 candidates' prompts, 20 x 50 x 1024: 0.10 against 2.7 ms on the 2-core
    machine). An Engine whose graphs take float16 prompts does this to every prompt array that comes from the
    host. Where the cast graph cannot load, numpy's cast (one warning)."""
    a = np.asarray(a)
    if np.dtype(dtype) != np.float16 or a.dtype != np.float32 or a.size < CAST_MIN:
        return np.ascontiguousarray(a, dtype=dtype)
    sess = _cast["session"]
    if sess is None and not _cast["failed"]:
        with _cast_lock:
            if _cast["session"] is None and not _cast["failed"]:
                try:
                    import onnxruntime as ort

                    so = ort.SessionOptions()
                    so.intra_op_num_threads = 1
                    so.inter_op_num_threads = 1
                    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    _cast["session"] = ort.InferenceSession(str(CAST_PATH), so, providers=["CPUExecutionProvider"])
                except Exception as e:  # noqa: BLE001 - an optimisation: numpy's cast is the same
                    _cast["failed"] = True
                    warn(f"the host cast graph did not load ({str(e)[:200]}): prompts are cast to float16 by numpy")
            sess = _cast["session"]
    if sess is None:
        return np.ascontiguousarray(a, dtype=dtype)
    return sess.run(None, {"x": np.ascontiguousarray(a)})[0]


#: the two more of "packed_host" graphs whose first layer projects the rows' shared prefix once per candidate
#: (manifest shared_prefix > 0; export/packing.py, prefix=True)
PREFIX_INPUTS = ("packed_compact_index", "packed_token_rows")


def layout_inputs(manifest) -> tuple[str, ...]:
    """The inputs a manifest's layout adds to the graph contract: the packing of "packed_host" graphs, and the
    shared-prefix packing where such a graph's first layer shares its rows (shared_prefix > 0)."""
    if not manifest.host_packing:
        return ()
    return PACKING_INPUTS + (PREFIX_INPUTS if manifest.shared_prefix else ())


def disabled_optimizers(manifest) -> tuple[str, ...]:
    """ORT optimizers a layout must not get. The flash kernel's query projection is MatMul + Add (bias):
    MatMulAddFusion makes it a Gemm, which ORT's CUDA provider runs as a bias broadcast into the output
    plus a GEMM with beta = 1 (measured on an H100, roberta-large shape, 20 stacked candidates: 2.6 ms of
    BroadcastBiasKernel and 0.5 ms of slower GEMM per call; the Add alone reads and writes the query once)."""
    return ("MatMulAddFusion",) if manifest.packed_kernel in SPLIT_KERNELS else ()


def packing_feeds(attention_mask: np.ndarray, pop: int, shared_prefix: int = 0) -> dict[str, np.ndarray]:
    """The packing of ``pop`` candidates x the rows of a right-padded ``attention_mask`` [batch, seq]
    (row ``c * batch + i`` = candidate c, example i), as a "packed_host" graph takes it:
    ``packed_token_index`` int64 [tokens]: rows of the flattened [pop * batch * seq, hidden] tensor
    that hold real tokens, in order; ``packed_token_offset`` int32 [rows, seq]: those indices, then
    the padded ones (RemovePadding's token_offset); ``packed_cu_seqlens`` int32 [rows + 1].

    ``shared_prefix`` = P > 0 (a graph packed with ``prefix=True``; the rows' first P tokens are the same in
    every example of a candidate): ``packed_compact_index`` int64 [compact]: the packed tokens the first layer
    projects (every token but positions 0 .. P - 1 of a candidate's examples after its first), in order;
    ``packed_token_rows`` int32 [tokens]: the row of that projection each packed token reads (its own, or the
    same position of its candidate's first example)."""
    am = np.asarray(attention_mask)
    batch, seq = am.shape
    row_len = am.sum(axis=1).astype(np.int64)
    if len(am) and not np.array_equal(am.astype(bool), np.arange(seq)[None, :] < row_len[:, None]):
        raise ConfigError("packed attention needs right-padded rows (1s then 0s in attention_mask)")
    real = np.tile(am.astype(bool).reshape(-1), pop)
    flat = np.arange(pop * batch * seq, dtype=np.int64)
    index = flat[real]
    offset = np.concatenate([index, flat[~real]]).astype(np.int32).reshape(pop * batch, seq)
    lens = np.tile(row_len, pop)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    out = {"packed_token_index": index, "packed_token_offset": offset, "packed_cu_seqlens": cu}
    if shared_prefix:
        if len(am) and row_len.min() < shared_prefix:
            raise ConfigError(f"this packed export shares the first {shared_prefix} positions of every row; a row "
                              f"holds {int(row_len.min())} tokens: rows need [CLS] and the prompt at least")
        row = np.repeat(np.arange(pop * batch), lens)  # the row of each packed token
        pos = np.arange(len(index)) - np.repeat(cu[:-1].astype(np.int64), lens)
        keep = ~((pos < shared_prefix) & (row % batch > 0))
        first = cu[(row // batch) * batch].astype(np.int64) + pos  # the same position in the candidate's first row
        compact = np.cumsum(keep) - 1
        out["packed_compact_index"] = np.flatnonzero(keep).astype(np.int64)
        out["packed_token_rows"] = compact[np.where(keep, np.arange(len(index)), first)].astype(np.int32)
    return out


@dataclass
class FixedBatch:
    """A tokenised example set prepared once: length buckets with their feeds ready to send."""

    enc: Encoded
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]]  # (row index, feeds without the prompt)
    padded_fraction: float
    uid: int = field(default_factory=lambda: next(_BATCH_IDS))  # never reused (IOBinding cache key)

    @property
    def n(self) -> int:
        return len(self.enc)

    @property
    def labels(self) -> np.ndarray:
        return self.enc.labels


@dataclass
class _Binding:
    """A prepared IOBinding for one (graph, bucket, candidates-per-run) shape."""

    sess: object
    io: object
    prompt: object  # OrtValue, updated in place every run
    out: np.ndarray  # host buffer for the logits [rows, n_bucket, labels]
    out_dev: object  # device OrtValue for the logits (CUDA) or None (CPU: ORT writes into `out`)
    run_opts: object
    keep: tuple  # OrtValues that must outlive the binding


class DevicePrompts:
    """Prompts [pop, L, hidden] that :meth:`Engine.project` made in the engine's prompt buffer.

    ``logits``/``logits_multi`` of the same engine bind that buffer directly; anything else (another
    engine, indexing, ``np.asarray``) gets the host projection ``z @ At`` (float32), so the object
    can stand wherever a prompt array can. The buffer is shared by every candidate set of this
    population size: a set used after another was projected is projected again first.
    """

    def __init__(self, engine: Engine, z: np.ndarray):
        self.engine = engine
        self.z = z  # [pop, d] float32
        self.shape = (z.shape[0], engine.manifest.n_prompt, engine.manifest.hidden)

    def host(self) -> np.ndarray:
        return self.engine.host_projection(self.z)

    def __array__(self, dtype=None, copy=None):
        a = self.host()
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, idx):
        return self.host()[idx]


@dataclass
class _Projection:
    """The bound projection run for one population size."""

    io: object
    z: object  # OrtValue [pop, d] float32, updated in place
    prompt: object  # OrtValue [pop, L, hidden]: the buffer the graphs' bindings read
    holds: weakref.ref | None  # the candidate set now in ``prompt`` (weak: a DevicePrompts refers to its
    # engine, so a strong reference here would be a cycle keeping the sessions and their device memory alive)
    keep: tuple


class Engine:
    """Sessions for the graphs a run needs, plus the counters the benchmarks read.

    CPU: ``workers`` single-threaded session runs in parallel (default one per core), one candidate
    per run. CUDA: every candidate of a job stacked in one run per length bucket, through IOBinding
    with the fixed token inputs resident on the device; with ``cuda_graph`` each (graph, bucket)
    shape is captured once as a CUDA graph and replayed.
    """

    def __init__(self, manifest: Manifest, graphs: list[int], device: str = "auto", cands_per_call: int = 0,
                 threads: int = 0, workers: int = 0, optimization: str = "all", share_weights: bool | None = None,
                 iobinding: bool | None = None, cuda_graph: bool = False, device_weights: bool | None = None,
                 concurrent_graphs: bool | None = None, attention: str | None = None):
        self.manifest = manifest
        self.graphs = sorted(set(graphs))
        for g in self.graphs:
            if g < 0 or g > manifest.k:
                raise ConfigError(f"graph {g} asked for, the model dir has graphs 0..{manifest.k}: "
                                  f"re-export with --k {g} or lower --k")
        if share_weights is None:
            # int8 weights are small and gain most from ORT's prepacking, which sharing turns off: measured
            # roberta-base SST-2 pass 463 -> 365 ms unshared (+~100 MB per extra session); fp32/fp16 share
            share_weights = manifest.precision != "int8"
        self._share = bool(share_weights)
        # several graphs of one job (clip's K thinned networks) run at once, one thread each (opt-in)
        self.concurrent_graphs = env_flag("CLIPTUNE_CONCURRENT_GRAPHS", concurrent_graphs)
        # CUDA: the shared tensors as device OrtValues, one copy for every session (opt-in until measured on a card)
        self.device_weights = env_flag("CLIPTUNE_DEVICE_WEIGHTS", device_weights)
        # CUDA: which of ORT's attention kernels the graphs' attention nodes run ('auto': ORT's choice)
        self.attention = attention_kernel(attention)
        self._threads, self._workers, self._optimization = threads, workers, optimization
        self.cuda_graph = bool(cuda_graph)
        device_asked = device
        self.device = resolve_device(device)
        if self.cuda_graph and self.device != "cuda":
            raise ConfigError("cuda_graph needs --device cuda (CUDA graphs exist on the CUDA provider only)")
        if manifest.packed:
            if self.device != "cuda":
                raise ConfigError(f"{manifest.root} holds packed-attention graphs, which run on the CUDA provider "
                                  "only: use --device cuda on a GPU, or the unpacked export they were made from")
            if self.cuda_graph and not manifest.host_packing:
                raise ConfigError("packed-attention graphs cannot be captured as CUDA graphs (RemovePadding reads "
                                  "the token count back every run): drop cuda_graph, or export with --packed host")
        if self.device == "cpu":
            int8_saturation_warning(manifest.int8_weights, str(manifest.root))
        try:
            self._open_sessions()
        except ProviderError:
            if device_asked != "auto" or self.device == "cpu" or manifest.packed:
                raise
            warn("the CUDA provider did not take; falling back to the CPU (pass --device cuda to make this an error)")
            self.device = "cpu"
            self._open_sessions()
        self.iobinding = (self.device == "cuda") if iobinding is None else bool(iobinding)
        if self.cuda_graph:
            self.iobinding = True
        self.cands_per_call = int(cands_per_call) if cands_per_call else (1 if self.device == "cpu" else 10**9)
        # the prompts' type: the manifest's, which check_contract held every graph's prompt_embeds input to
        self.dtype = np.float16 if self.manifest.prompt_dtype == "float16" else np.float32
        self.forward_passes = 0  # candidate x example-set passes through one graph
        self.session_runs = 0
        self.session_seconds = 0.0
        self._bound: dict = {}  # (graph, id(batch), part, rows) -> _Binding
        self._resident: dict = {}  # (id(batch), part) -> fixed inputs as device OrtValues
        self._at: np.ndarray | None = None  # the projection At [d, L*hidden] (enable_projection)
        self._at_value = None  # ... resident on the device
        self._projector = None
        self._projections: dict[int, _Projection] = {}  # population size -> bound projection run

    def _open_sessions(self) -> None:
        cores = os.cpu_count() or 1
        self.workers = 1 if self.device == "cuda" else (self._workers or (1 if self._threads else cores))
        threads = self._threads or (1 if self.workers > 1 else cores)
        spec = SessionSpec(device=self.device, threads=threads, n_live=max(len(self.graphs), self.workers),
                           optimization=self._optimization, cuda_graph=self.cuda_graph, attention=self.attention,
                           disabled_optimizers=disabled_optimizers(self.manifest),
                           ops_library="cuda" if self.manifest.needs_ops_library else None)
        self.shared: SharedWeights | None = None
        if self._share:
            on_device = self.device_weights and self.device == "cuda"
            self.shared = SharedWeights(self.manifest, device=self.device if on_device else "cpu",
                                        graphs=self.graphs if on_device else None)
        self.sessions = {}
        self.open_seconds: dict[int, float] = {}  # per graph: session creation (load, optimise, weights placed)

        t_open = time.perf_counter()

        def make(g: int):
            t0 = time.perf_counter()
            sess = self._make(g, spec)
            return sess, round(time.perf_counter() - t0, 4)

        if len(self.graphs) > 1:
            # ONNX Runtime builds a session mostly with the GIL released: opening the K+1 graphs at once took
            # 0.087 -> 0.054 s (splade-tiny K = 4) and 0.17 -> 0.12 s (roberta-large K = 1) on 2 cores
            with ThreadPoolExecutor(min(len(self.graphs), 8), thread_name_prefix="cliptune-open") as ex:
                futures = {g: ex.submit(make, g) for g in self.graphs}
            made = {g: f.result() for g, f in futures.items()}  # the first graph's error, in graph order
        else:
            made = {g: make(g) for g in self.graphs}
        for g in self.graphs:
            self.sessions[g], self.open_seconds[g] = made[g]
        self.open_wall_seconds = round(time.perf_counter() - t_open, 4)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        # one thread per graph, always the same one (its bindings and CUDA graphs stay its own)
        self._graph_threads = ({g: ThreadPoolExecutor(1, thread_name_prefix=f"cliptune-graph{g}") for g in self.graphs}
                               if self.concurrent_graphs and self.workers == 1 and len(self.graphs) > 1 else None)
        self._graph_runs: dict = {}  # (graph, batch, part, rows, on device) -> runs made on its graph's thread

    def _make(self, g: int, spec: SessionSpec):
        path = self.manifest.graph_path(g)
        sess = make_session(path, spec, self.shared)
        check_contract(sess, path, self.manifest.hidden, extra=layout_inputs(self.manifest),
                       prompt_dtype=self.manifest.prompt_dtype)
        meta = sess.get_modelmeta().custom_metadata_map
        want = self.manifest.data["export_id"]
        got_id, got_index = meta.get("cliptune.export_id"), meta.get("cliptune.graph_index")
        if got_id != want or got_index != str(g):
            raise IntegrityError(f"{path} comes from export {got_id} as graph {got_index}, the manifest expects "
                                 f"export {want} graph {g}: do not mix or rename files of different exports; re-export")
        return sess

    @property
    def provider(self) -> str:
        return next(iter(self.sessions.values())).get_providers()[0]

    def prepare(self, enc: Encoded, n_buckets: int = 1) -> FixedBatch:
        """Split ``enc`` into length buckets once and build their (constant) feeds.

        Packed-attention graphs compute no padded token, so buckets only bound memory there (the
        tuner gives their train set one bucket; dev/test keep their memory-bounded chunks)."""
        sp = self.manifest.shared_prefix
        if sp and len(enc) and (enc.ids[:, :sp] != enc.ids[:1, :sp]).any():
            # graphs of this export project positions 0..L once per candidate from the first row, so
            # rows that do not share them (a manual run: no placeholders) go in groups of equal
            # prefixes, each bucketed on its own (one row per group for free text: exact, just slower)
            groups: dict[bytes, list[int]] = {}
            for i, row in enumerate(enc.ids[:, :sp]):
                groups.setdefault(row.tobytes(), []).append(i)
            split = []
            for members in groups.values():
                rows = np.asarray(members)
                sub = enc.take(rows)
                sub.min_seq = enc.min_seq
                split += [(rows[idx], part) for idx, part in buckets(sub, n_buckets)]
        else:
            split = buckets(enc, n_buckets)
        parts = []
        for idx, sub in split:
            feeds = {"input_ids": np.ascontiguousarray(sub.ids), "attention_mask": np.ascontiguousarray(sub.attention_mask),
                     "mask_pos": np.ascontiguousarray(sub.mask_pos)}
            parts.append((idx, feeds))
        return FixedBatch(enc, parts, padded_fraction(split))

    # ------------------------------------------------------------ prompts made on the device

    def enable_projection(self, at: np.ndarray) -> None:
        """Let :meth:`project` make prompts from candidates with the projection ``at`` [d, L * hidden]
        (float32; kept by reference, not copied). Once per engine: the prompt buffers stay bound."""
        at = np.asarray(at)
        size = self.manifest.n_prompt * self.manifest.hidden
        if at.dtype != np.float32 or at.ndim != 2 or at.shape[1] != size:
            raise ConfigError(f"the projection must be float32 [d, {self.manifest.n_prompt} * {self.manifest.hidden}],"
                              f" got {at.dtype} {list(at.shape)}")
        if self._at is not None and at is not self._at:
            raise ConfigError("this engine already has a projection (one per engine): make a new Engine for another")
        self._at = at

    def projects_on_device(self, pop: int) -> bool:
        """Whether :meth:`project` runs the projection graph for ``pop`` candidates: the engine binds its
        runs (IOBinding) and stacks all ``pop`` candidates in one run per graph."""
        return (self._at is not None and self._projector is not False and self.iobinding
                and pop <= self.cands_per_call)

    def _need_projection(self) -> None:
        if self._at is None:
            raise ConfigError("prompts from candidates need the projection first (Engine.enable_projection)")

    def host_projection(self, z: np.ndarray) -> np.ndarray:
        """Prompts [pop, L, hidden] = ``z @ At`` with numpy (float32): what the device projection computes."""
        self._need_projection()
        z = np.asarray(z, dtype=np.float32).reshape(-1, self._at.shape[0])
        return (z @ self._at).reshape(z.shape[0], self.manifest.n_prompt, self.manifest.hidden)

    def project(self, z: np.ndarray) -> DevicePrompts | np.ndarray:
        """Prompts [pop, L, hidden] for candidates ``z`` [pop, d]: a :class:`DevicePrompts` made on the
        device where :meth:`projects_on_device`, else the float32 host array ``z @ At``."""
        self._need_projection()
        z = np.ascontiguousarray(z, dtype=np.float32).reshape(-1, self._at.shape[0])
        if self.projects_on_device(z.shape[0]) and self._projector is None:
            try:
                self._open_projector()
            except (ModelDirError, ProviderError, RuntimeError, OSError) as e:  # an optimisation: the host path is equal
                self._projector = False
                warn(f"the prompt projection graph did not load on {self.device} ({str(e)[:200]}): prompts are "
                     "projected on the host and copied to every graph")
        if not self.projects_on_device(z.shape[0]):
            return self.host_projection(z)
        prompts = DevicePrompts(self, z)
        self._run_projection(prompts)
        return prompts

    def _open_projector(self) -> None:
        import onnxruntime as ort

        name = "fp16" if self.dtype == np.float16 else "fp32"
        # true fp32 on CUDA (ORT's MatMul would use TF32): the prompts equal the host projection's to ~1e-6
        spec = SessionSpec(device=self.device, threads=1, optimization="all",
                           cuda_options={"use_tf32": "0"} if self.device == "cuda" else {})
        sess = make_session(PROJECTION_DIR / f"projection_{name}.onnx", spec)
        self._at_value = ort.OrtValue.ortvalue_from_numpy(self._at, self.device, 0)
        self._projector = sess

    def _run_projection(self, prompts: DevicePrompts) -> None:
        """Project ``prompts.z`` into the buffer of its population size."""
        import onnxruntime as ort

        z, pop, dev = prompts.z, prompts.shape[0], self.device
        st = self._projections.get(pop)
        if st is None:
            io = self._projector.io_binding()
            z_host = np.zeros_like(z)
            z_v = ort.OrtValue.ortvalue_from_numpy(z_host, dev, 0)
            shape = np.array([pop, self.manifest.n_prompt, self.manifest.hidden], dtype=np.int64)
            shape_v = ort.OrtValue.ortvalue_from_numpy(shape, "cpu", 0)  # Reshape reads its shape on the host
            prompt_v = ort.OrtValue.ortvalue_from_shape_and_type((pop, self.manifest.n_prompt, self.manifest.hidden),
                                                                 self.dtype, dev, 0)
            io.bind_ortvalue_input("z", z_v)
            io.bind_ortvalue_input("at", self._at_value)
            io.bind_ortvalue_input("shape", shape_v)
            io.bind_ortvalue_output("prompt", prompt_v)
            st = _Projection(io, z_v, prompt_v, None, (z_host, shape, shape_v))
            self._projections[pop] = st
        st.z.update_inplace(z)
        if self.device != "cuda":
            st.io.synchronize_inputs()
        self._projector.run_with_iobinding(st.io)
        st.holds = weakref.ref(prompts)

    def _current(self, prompts: DevicePrompts) -> None:
        """Make the shared buffer hold ``prompts`` (projecting again if another set overwrote it)."""
        st = self._projections.get(prompts.shape[0])
        if st is None or st.holds is None or st.holds() is not prompts:
            self._run_projection(prompts)

    # ------------------------------------------------------------ forward

    def logits(self, graph: int, prompts: np.ndarray, batch: FixedBatch, verbalizer_ids: np.ndarray) -> np.ndarray:
        """Logits [pop, n, labels] of graph ``graph`` for prompts [pop, L, hidden] on ``batch``."""
        return self.logits_multi([(graph, prompts)], batch, verbalizer_ids)[0]

    def logits_multi(self, jobs: list[tuple[int, np.ndarray]], batch: FixedBatch,
                     verbalizer_ids: np.ndarray) -> list[np.ndarray]:
        """Several (graph, prompts [pop, L, hidden]) at once -> one logits [pop, n, labels] each.

        Every (graph, candidate chunk, length bucket) is one session run; on the CPU they are spread
        over ``workers`` single-threaded runs in parallel (measured faster than one run using every
        core for these small GEMMs), on CUDA they run in turn.
        """
        labels = len(verbalizer_ids)
        outs = []
        units = []
        for j, (graph, prompts) in enumerate(jobs):
            pop = prompts.shape[0]
            outs.append(np.empty((pop, batch.n, labels), dtype=np.float32))
            if isinstance(prompts, DevicePrompts):
                if prompts.engine is self and self.projects_on_device(pop):
                    self._current(prompts)
                    for part, (idx, _) in enumerate(batch.parts):
                        units.append((j, graph, 0, prompts, idx, part))
                    self.forward_passes += pop
                    continue
                prompts = prompts.host()
            step = max(1, min(self.cands_per_call, pop))
            for c0 in range(0, pop, step):
                chunk = host_cast(prompts[c0:c0 + step], self.dtype)
                for part, (idx, feeds) in enumerate(batch.parts):
                    units.append((j, graph, c0, chunk, idx, part))
            self.forward_passes += pop

        verb = np.ascontiguousarray(verbalizer_ids, dtype=np.int64)
        host_packing = self.manifest.host_packing

        def run(unit):
            j, graph, c0, chunk, idx, part = unit
            feeds = batch.parts[part][1]
            if host_packing and not self.iobinding:
                feeds = {**feeds, **self._packing(batch, part, chunk.shape[0])}
            t0 = time.perf_counter()
            if self.iobinding:
                res = self._run_bound(graph, batch, part, chunk, verb)
            else:
                res = self.sessions[graph].run(["logits"], {**feeds, "prompt_embeds": chunk,
                                                            "verbalizer_ids": verb})[0]
            outs[j][c0:c0 + chunk.shape[0], idx] = res
            return time.perf_counter() - t0

        if self._graph_threads is not None and len({u[1] for u in units}) > 1:
            self.session_seconds += self._run_by_graph(units, run, batch, verb.tobytes())
        else:
            if self._pool is not None and len(units) > 1:
                secs = list(self._pool.map(run, units))
            else:
                secs = [run(u) for u in units]
            self.session_seconds += sum(secs)
        self.session_runs += len(units)
        return outs

    #: runs of a binding before it may overlap another graph's: ORT's CUDA provider runs a new shape one or
    #: two times (by version), then captures it as a CUDA graph, kept in the calling thread's context; the
    #: capture (cudaStreamCaptureModeGlobal) must not overlap CUDA work from another thread
    WARM_RUNS = 3

    def _run_by_graph(self, units: list, run, batch: FixedBatch, verb: bytes) -> float:
        """Each graph's units on that graph's own thread, the graphs at once (their sessions, streams and
        bindings are separate; the prompts are read-only). Until every binding involved has run
        :attr:`WARM_RUNS` times, the graphs take turns. Returns the wall time."""
        by_graph: dict[int, list] = {}
        for u in units:
            by_graph.setdefault(u[1], []).append(u)

        def key(u):
            return (u[1], batch.uid, u[5], u[3].shape, isinstance(u[3], DevicePrompts), verb)

        warm = all(self._graph_runs.get(key(u), 0) >= self.WARM_RUNS for u in units)
        t0 = time.perf_counter()
        if warm:
            futures = [self._graph_threads[g].submit(lambda us=us: [run(u) for u in us]) for g, us in by_graph.items()]
            for f in futures:
                f.result()
        else:
            for g, us in by_graph.items():
                self._graph_threads[g].submit(lambda us=us: [run(u) for u in us]).result()
        for u in units:
            self._graph_runs[key(u)] = self._graph_runs.get(key(u), 0) + 1
        return time.perf_counter() - t0

    def _run_bound(self, graph: int, batch: FixedBatch, part: int, chunk: np.ndarray,
                   verb: np.ndarray) -> np.ndarray:
        """One run through IOBinding: token inputs stay on the device, the prompts are copied into a
        persistent device buffer (or, for :class:`DevicePrompts`, the projection's buffer is bound: no
        copy), the logits land in a persistent host buffer (no per-call allocation)."""
        import onnxruntime as ort

        on_device = isinstance(chunk, DevicePrompts)
        # one binding per worker thread: parallel CPU runs must not share a prompt buffer
        key = (graph, batch.uid, part, chunk.shape, verb.tobytes(), threading.get_ident(), on_device)
        b = self._bound.get(key)
        if b is None:
            feeds = batch.parts[part][1]
            dev = self.device
            rkey = (batch.uid, part)
            if rkey not in self._resident:
                self._resident[rkey] = {k: ort.OrtValue.ortvalue_from_numpy(v, dev, 0) for k, v in feeds.items()}
            fixed = self._resident[rkey]
            if self.manifest.host_packing:  # per population size, also resident
                pkey = (batch.uid, part, chunk.shape[0])
                if pkey not in self._resident:
                    self._resident[pkey] = {k: ort.OrtValue.ortvalue_from_numpy(v, dev, 0)
                                            for k, v in self._packing(batch, part, chunk.shape[0]).items()}
                fixed = {**fixed, **self._resident[pkey]}
            sess = self.sessions[graph]
            io = sess.io_binding()
            for name, value in fixed.items():
                io.bind_ortvalue_input(name, value)
            verb_host = verb.copy()  # CPU OrtValues alias numpy memory: keep every array alive
            verb_v = ort.OrtValue.ortvalue_from_numpy(verb_host, dev, 0)
            io.bind_ortvalue_input("verbalizer_ids", verb_v)
            if on_device:  # the projection writes it before every run; read-only here
                prompt_host = None
                prompt_v = self._projections[chunk.shape[0]].prompt
            else:
                prompt_host = np.zeros(chunk.shape, chunk.dtype)
                prompt_v = ort.OrtValue.ortvalue_from_numpy(prompt_host, dev, 0)
            io.bind_ortvalue_input("prompt_embeds", prompt_v)
            out = np.empty((chunk.shape[0], feeds["input_ids"].shape[0], len(verb)), dtype=np.float32)
            out_v = ort.OrtValue.ortvalue_from_numpy(out, "cpu", 0)
            if self.device == "cuda":  # logits land on the device, then one small copy to the host buffer
                out_dev = ort.OrtValue.ortvalue_from_shape_and_type(out.shape, np.float32, "cuda", 0)
                io.bind_ortvalue_output("logits", out_dev)
            else:
                out_dev = None
                io.bind_ortvalue_output("logits", out_v)
            run_opts = ort.RunOptions()
            if self.cuda_graph:
                run_opts.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
            b = _Binding(sess, io, prompt_v, out, out_dev, run_opts, (verb_v, verb_host, prompt_host, out_v, fixed))
            self._bound[key] = b
        if not on_device:
            b.prompt.update_inplace(chunk)
        if b.out_dev is None:
            b.io.synchronize_inputs()
            b.sess.run_with_iobinding(b.io, b.run_opts)
            return b.out
        b.sess.run_with_iobinding(b.io, b.run_opts)
        b.out[...] = b.out_dev.numpy()
        return b.out

    def _packing(self, batch: FixedBatch, part: int, pop: int) -> dict[str, np.ndarray]:
        key = ("packing", batch.uid, part, pop)
        if key not in self._resident:
            self._resident[key] = packing_feeds(batch.parts[part][1]["attention_mask"], pop,
                                                self.manifest.shared_prefix)
        return self._resident[key]

    def close(self) -> None:
        """Release the sessions and what they hold (ORT's memory arenas, device buffers, bound inputs and
        outputs, CUDA graphs) now rather than whenever the last reference goes: a process that runs one
        tune after another (benchmarks/accuracy.py) would otherwise keep every finished run's GPU memory
        while anything still refers to its engine (measured on an H100: the third DBpedia K = 8 run in one
        process ran out of its 80 GB). The engine cannot run afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for ex in (self._graph_threads or {}).values():
            ex.shutdown(wait=True)
        self._graph_threads = None
        self._bound.clear()
        self._resident.clear()
        self._projections.clear()
        self._projector = self._at_value = None
        self.sessions = {}
        self.shared = None
