"""The forward engine: K+1 sessions over one model directory, fed fixed token batches.

``Engine.logits(graph, prompts, batch)`` returns verbalizer logits [pop, n, labels] for the
candidate prompts [pop, L, hidden] on a fixed :class:`FixedBatch` (tokenised once, split into
length buckets once). Candidates are sent ``cands_per_call`` at a time: one per call on the CPU
(stacking is slower per candidate there), all stacked on CUDA.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .encoding import Encoded, buckets, padded_fraction
from .errors import ConfigError, ProviderError
from .manifest import Manifest
from .sessions import SessionSpec, SharedWeights, check_contract, make_session, resolve_device, warn


@dataclass
class FixedBatch:
    """A tokenised example set prepared once: length buckets with their feeds ready to send."""

    enc: Encoded
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]]  # (row index, feeds without the prompt)
    padded_fraction: float

    @property
    def n(self) -> int:
        return len(self.enc)

    @property
    def labels(self) -> np.ndarray:
        return self.enc.labels


class Engine:
    """Sessions for the graphs a run needs, plus the counters the benchmarks read."""

    def __init__(self, manifest: Manifest, graphs: list[int], device: str = "auto", cands_per_call: int = 0,
                 threads: int = 0, workers: int = 0, optimization: str = "all", share_weights: bool = True):
        self.manifest = manifest
        asked = device
        self.device = resolve_device(device)
        self.graphs = sorted(set(graphs))
        for g in self.graphs:
            if g < 0 or g > manifest.k:
                raise ConfigError(f"graph {g} asked for, the model dir has graphs 0..{manifest.k}: "
                                  f"re-export with --k {g} or lower --k")
        self.shared = SharedWeights(manifest) if share_weights else None
        cores = os.cpu_count() or 1
        # CPU: `workers` parallel single-threaded runs (default: one per core); CUDA: one stream of runs
        self.workers = 1 if self.device == "cuda" else (workers or (1 if threads else cores))
        threads = threads or (1 if self.workers > 1 else cores)
        spec = SessionSpec(device=self.device, threads=threads, n_live=max(len(self.graphs), self.workers),
                           optimization=optimization)
        try:
            self.sessions = {g: self._make(g, spec) for g in self.graphs}
        except ProviderError:
            if asked != "auto" or self.device == "cpu":
                raise
            warn("the CUDA provider did not take; falling back to the CPU (pass --device cuda to make this an error)")
            self.device = spec.device = "cpu"
            self.sessions = {g: self._make(g, spec) for g in self.graphs}
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 and self.device == "cpu" else None
        self.cands_per_call = int(cands_per_call) if cands_per_call else (1 if self.device == "cpu" else 10**9)
        pe = next(i for i in next(iter(self.sessions.values())).get_inputs() if i.name == "prompt_embeds")
        self.dtype = np.float16 if pe.type == "tensor(float16)" else np.float32
        self.forward_passes = 0  # candidate x example-set passes through one graph
        self.session_runs = 0
        self.session_seconds = 0.0

    def _make(self, g: int, spec: SessionSpec):
        path = self.manifest.graph_path(g)
        sess = make_session(path, spec, self.shared)
        meta = sess.get_modelmeta().custom_metadata_map
        want = self.manifest.data["export_id"]
        if meta.get("cliptune.export_id") not in (None, want):
            from .errors import IntegrityError

            raise IntegrityError(f"{path} comes from export {meta.get('cliptune.export_id')}, the manifest is "
                                 f"export {want}: do not mix files of different exports; re-export")
        check_contract(sess, path, self.manifest.hidden)
        return sess

    @property
    def provider(self) -> str:
        return next(iter(self.sessions.values())).get_providers()[0]

    def prepare(self, enc: Encoded, n_buckets: int = 1) -> FixedBatch:
        """Split ``enc`` into length buckets once and build their (constant) feeds."""
        parts = []
        split = buckets(enc, n_buckets)
        for idx, sub in split:
            feeds = {"input_ids": np.ascontiguousarray(sub.ids), "attention_mask": np.ascontiguousarray(sub.attention_mask),
                     "mask_pos": np.ascontiguousarray(sub.mask_pos)}
            parts.append((idx, feeds))
        return FixedBatch(enc, parts, padded_fraction(split))

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
            step = max(1, min(self.cands_per_call, pop))
            for c0 in range(0, pop, step):
                chunk = np.ascontiguousarray(prompts[c0:c0 + step], dtype=self.dtype)
                for idx, feeds in batch.parts:
                    units.append((j, graph, c0, chunk, idx, feeds))
            self.forward_passes += pop

        def run(unit):
            j, graph, c0, chunk, idx, feeds = unit
            t0 = time.perf_counter()
            res = self.sessions[graph].run(["logits"], {**feeds, "prompt_embeds": chunk,
                                                        "verbalizer_ids": verbalizer_ids})[0]
            outs[j][c0:c0 + chunk.shape[0], idx] = res
            return time.perf_counter() - t0

        if self._pool is not None and len(units) > 1:
            secs = list(self._pool.map(run, units))
        else:
            secs = [run(u) for u in units]
        self.session_seconds += sum(secs)
        self.session_runs += len(units)
        return outs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
