"""benchmarks/gpu.py end to end on the CPU (its --cpu-dry-run), so the device script cannot rot.

A GPU run is rare and short (one prepared call on a lent card), so the script's every section runs
here on a tiny random RoBERTa: the exports (fp16 with K=1, its packed copies), PyTorch fp16/bf16,
the ORT cells, the kernel-time split, the parity table, the variant choice and two short tune runs.
The packed cells need the CUDA provider; on the CPU the script must say so and tune on the padded
graphs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_export

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [needs_export, pytest.mark.slow]


def test_gpu_script_cpu_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--cpu-dry-run", "--out", str(out),
                        "--work", str(work), "--skip", "fp32,profile", "--moe", "--fp16-k", "2", "--budget", "40",
                        "--cma-eigen", "ahead", "--eigen-ab"],
                       check=False, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads((out / "gpu_cpu-dry-run.json").read_text())
    assert data["status"] == "done" and data["errors"] == []
    assert {"torch_fp32", "torch_fp16", "ort_fp16", "cma", "tune_bbt"} <= set(data["sections_done"])
    cma = data["cma_blas"]  # ask/tell timed per BLAS thread count; the tune run used the chosen one
    assert cma["ms_per_gen"]["1"] > 0 and str(cma["chosen_threads"]) in cma["ms_per_gen"]
    assert data["tune"]["bbt"]["blas_threads"] == cma["chosen_threads"]
    assert data["tune"]["bbt"]["projection_on_device"] is False  # CPU: one candidate per call, host prompts
    assert data["export"]["packed"]["packed_attention_nodes"] == [2, 2, 2]  # 3 layers: 2 full + the mask layer
    assert data["export"]["packed_host"]["packed_attention_nodes"] == [2, 2, 2]
    moe = data["export"]["packed_host_flash_moe"]  # the MoE feed-forward copy is made (and timed on a GPU)
    assert moe["ffn"] == "moe" and moe["kernel"] == "flash" and moe["packed_attention_nodes"] == [2, 2, 2]
    res = data["export"]["packed_host_flash_ltres"]  # residuals in the FusedDense epilogue (timed on a GPU)
    assert res["ffn"] == "cublaslt_res" and res["packed_attention_nodes"] == [2, 2, 2]
    dnn = data["export"]["packed_host_cudnn_ltres"]  # cuDNN's ragged attention (smoke-tested, then timed on a GPU)
    assert dnn["kernel"] == "cudnn" and dnn["ffn"] == "cublaslt_res" and dnn["packed_attention_nodes"] == [2, 2, 2]
    short = data["export"]["packed_host_short_lt"]  # cliptune's short-row attention kernel (smoke-tested on a GPU)
    assert short["kernel"] == "short" and short["ffn"] == "cublaslt" and short["packed_attention_nodes"] == [2, 2, 2]
    sqkv = data["export"]["packed_host_shortqkv_lt"]  # the same kernel on one QKV projection read in place
    assert sqkv["kernel"] == "short_qkv" and sqkv["packed_attention_nodes"] == [2, 2, 2]
    assert sqkv["front"] == "gather"
    pa = data["export"]["packed_host_shortqkv_ltpa"]  # the same with cliptune's PackAdd making the packed input
    assert pa["kernel"] == "short_qkv" and pa["front"] == "fused" and pa["packed_attention_nodes"] == [2, 2, 2]
    pipe = data["export"]["packed_host_pipeqkv_ltpa"]  # the same with the pipelined kernel (impl 2)
    assert pipe["kernel"] == "pipe_qkv" and pipe["front"] == "fused" and pipe["packed_attention_nodes"] == [2, 2, 2]
    assert pipe["shared_prefix"] == 0
    sp = data["export"]["packed_host_shortqkv_ltpa_spqb"]  # impl 1 + the shared rows + the query bias in the op
    assert sp["kernel"] == "short_qkv" and sp["front"] == "fused" and sp["shared_prefix"] > 1
    assert sp["prompt_dtype"] == "float32" and sp["q_bias"] == "attention" and pipe["q_bias"] == "projection"
    sp16 = data["export"]["packed_host_pipeqkv_ltpa_spqb16"]  # impl 2 + the shared rows + query bias + float16 prompts
    assert sp16["kernel"] == "pipe_qkv" and sp16["shared_prefix"] > 1 and sp16["prompt_dtype"] == "float16"
    assert sp16["q_bias"] == "attention"
    assert "CUDA provider" in data["packed_note"]
    assert not any(c["mode"].startswith("packed") for c in data["cells"])
    assert data["tune_variant"]["used"] == "padded"
    # variants are compared as the tunes call them: pop 20 from candidates z, where that cell was timed
    zpad = [c for c in data["cells"] if c["engine"] == "ort" and c["mode"] == "iobinding+z" and c["pop"] == 20
            and c["n_buckets"] == 4]
    assert zpad and data["tune_variant"]["candidates"]["padded"]["pop20_ms"] == zpad[0]["p50_ms"]
    # the generation as a tune makes it (z projected on the device) timed beside each host-prompt cell, and
    # ratioed apart: the headline ratios stay on host prompts
    zc = [c for c in data["cells"] if c.get("from_z")]
    assert {c["engine"] for c in zc} == {"torch", "ort"} and all(c["mode"].endswith("+z") for c in zc)
    assert any(c["engine"] == "ort" and c["pop"] == 1 and c["prompts_on_device"] for c in zc)
    assert not data["ratios"]["pop20"]["ort_mode"].endswith("+z")
    assert data["ratios"]["pop20_from_z"]["ort_mode"].endswith("+z")
    assert any(k.startswith("stacked generation from candidates z") for k in data["targets"])
    up = data["prompt_upload_pop20"]  # the host path's copy of the float32 prompts into the bound buffer
    assert up["p50_ms"] > 0 and up["bytes"] == 20 * 50 * 64 * 4 and up["device"] == "cpu"  # the dry run: hidden 64
    assert data["prompt_upload_pop20_fp16"]["bytes"] == up["bytes"] // 2 and data["host_cast_pop20"]["p50_ms"] > 0
    assert data["tune_variant"]["attention"] == "auto" and "attention_kernels" not in data  # a CUDA-only cell
    assert data["tune"]["bbt"]["attention_kernel"] == "auto"
    assert data["tune"]["bbt"]["calls"] == 40 and data["tune"]["bbt"]["variant"] == "padded"
    # --cma-eigen ahead for the tunes, then --eigen-ab: the bbt run again with pycma's own schedule
    assert data["tune"]["bbt"]["cma_eigen"] == "ahead" and data["tune"]["bbt_sync"]["cma_eigen"] == "sync"
    assert data["tune"]["bbt_sync"]["calls"] == 40 and "tune_bbt_sync" in data["sections_done"]
    assert "| bbt_sync | 40 |" in (out / "gpu_cpu-dry-run.md").read_text()
    assert "K=2 < 4" in data["tune"]["clip"]["skipped"]  # clip needs K=4 graphs
    cc = data["concurrent_graphs"]  # clip's graph calls in turn and at once: timed, same losses, not used on a CPU
    assert cc["k"] == 2 and cc["max_abs_loss_diff"] == 0.0 and cc["used_for_clip"] is False
    assert cc["sequential"]["p50_ms"] > 0 and cc["concurrent"]["p50_ms"] > 0
    par = data["parity"]["ort_fp16_iobinding"]  # the fp16 graph against torch fp32, same weights
    assert par["argmax_agreement"] == 1.0 and par["max_abs_diff"] < 2e-2
    phases = data["tune"]["bbt"]["setup_seconds"]  # where the run's start went, for the next card run
    assert {"manifest", "data", "sessions", "projection", "optimizer"} <= set(phases)
    assert sum(phases.values()) <= data["tune"]["bbt"]["timing_seconds"]["setup"] + 1e-3
    assert list(data["tune"]["bbt"]["session_open_seconds"]) == ["0"]  # bbt opens graph 0 only
    so = data["session_open"]  # the start-up breakdown on the tune export
    assert [o["graph"] for o in so["opens_shared_weights"]] == [0, 0, 1] and so["verify_full_s"] > 0
    assert set(so["graph0_by_optimization_s"]) == {"all", "basic", "disable"}
    assert "session_initialization" in so["ort_first_open_ms"]
    dw = so["device_weights"]  # on the CPU provider both are the host path: same losses, nothing on a device
    assert dw["max_abs_loss_diff"] == 0.0 and dw["on"]["device_values"] == 0 and dw["graphs"] == 3
    md = (out / "gpu_cpu-dry-run.md").read_text()
    assert md.startswith("# GPU benchmark: cpu-dry-run") and "bbt set-up by phase (s): {'manifest'" in md
    assert "Opening the tune export" in md and "Shared tensors as device OrtValues" in md
    assert "One clip generation (K = 2 graphs" in md


@pytest.mark.parametrize("name, cls", [
    # ORT's MoE block on CUDA: CUTLASS grouped GEMMs, then its routing passes (one contains "softmax")
    ("void cutlass::Kernel<ort_fastertransformer::MoeFCGemm<cutlass::half_t, 128, 128> >(Params)", "moe_gemm"),
    ("void ort_fastertransformer::topkGatingSoftmax<__half, 1, 1, 1, 4>(...)", "moe_routing"),
    ("void ort_fastertransformer::expandInputRowsKernel<__half>(...)", "moe_routing"),
    ("void ort_fastertransformer::finalizeMoeRoutingKernel<__half, 1>(...)", "moe_routing"),
    # the names ORT 1.31.1's MoE kernels had on an H100 (run 5): grouped GEMMs, a separate activation kernel
    ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS1_17GroupProblemShapeIN4cute5tupleIJlllEEEEE", "moe_gemm"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<cute::tuple<long",
     "moe_gemm"),
    ("void onnxruntime::llm::kernels::cutlass_kernels::doActivationKernel<__half, __half, __half, cutlass::epilogue::",
     "moe_activation"),
    ("void onnxruntime::llm::kernels::cutlass_kernels::expandInputRowsKernel<__half, __half, (onnxruntime::llm::",
     "moe_routing"),
    # the rest of a layer
    ("void onnxruntime::contrib::cuda::AddBiasTransposeQKV<__half>(...)", "qkv_bias_transpose"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128> >", "attention"),
    # ORT's memory-efficient attention (CUTLASS FMHA, CLIPTUNE_ATTENTION=efficient)
    ("void attention_kernel_batched_impl<AttentionKernel<cutlass::half_t, cutlass::arch::Sm80, true, 64, 64, 64>>(...)",
     "attention"),
    ("void cunn_SoftMaxForward<4, c10::Half>(...)", "attention"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<__half, 256>(...)", "layer_norm"),
    ("void onnxruntime::contrib::cuda::biasGeluKernel<__half, 4>(...)", "gelu"),
    # cuBLASLt GEMMs with the bias + GELU epilogue (cliptune's FusedDense) count as GEMMs, not as a GELU pass
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_bias_gelu_TNT", "gemm_gelu_epilogue"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize128x256x64_gelu_bias_execute_kernel__5x_cublas",
     "gemm_gelu_epilogue"),
    ("void onnxruntime::cuda::_BinaryElementWise<__half, ...>(...)", "other"),
    # cliptune's PackAdd (the packed first-layer input; nvcc's name for pack_add.cu's kernel) is packing
    ("(anonymous namespace)::PackAddVec(uint4 const*, uint4 const*, long const*, uint4*, long, long, long, long, long)",
     "packing"),
])
def test_kernel_classes(name, cls):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu = pytest.importorskip("gpu")
    assert gpu.kernel_class(name) == cls


def test_attention_kernels_cell_on_the_cpu(splade_dir, tmp_path):
    """The attention-kernel cell times each kernel and returns comparable logits (the CPU provider has one
    attention kernel, so they are equal here; on CUDA the gpu.py run compares FlashAttention with ORT's
    memory-efficient kernel and tunes with the faster sound one)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu = pytest.importorskip("gpu")
    prompts = (np.random.default_rng(2).standard_normal((3, 50, 128)) * 0.05).astype(np.float32)
    np.save(tmp_path / "p.npy", prompts)
    out = gpu.attention_kernels_cell(splade_dir, "cpu", "iobinding", prompts_path=str(tmp_path / "p.npy"), iters=2,
                                     warmup=1, split=False)
    assert list(out["kernels"]) == ["auto", "efficient"]
    for kern, row in out["kernels"].items():
        assert row["attention"] == kern and row["provider"] == "CPUExecutionProvider"
        assert row["pop1"]["p50_ms"] > 0 and row["pop20"]["p50_ms"] > 0
        assert np.asarray(row["logits"]).shape == (3, 32, 2) and row["max_abs_diff_vs_first"] == 0.0


def test_attention_section_in_a_child_process(splade_dir, tmp_path):
    """gpu.py's attention section: the cell runs in a child process and comes back as cells named
    ``<mode>+<kernel>`` and parity logits; here on the CPU provider with the padded export."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu = pytest.importorskip("gpu")
    prompts = (np.random.default_rng(4).standard_normal((2, 50, 128)) * 0.05).astype(np.float32)
    ak, cells, logits = gpu.attention_section(splade_dir, "iobinding", "cpu", prompts, tmp_path, iters=2, warmup=1,
                                              timeout_s=300)
    assert [c["mode"] for c in cells] == ["iobinding+auto"] * 2 + ["iobinding+efficient"] * 2
    assert [c["pop"] for c in cells] == [1, 20, 1, 20] and all(c["p50_ms"] > 0 for c in cells)
    assert set(logits) == {"ort_fp16_iobinding+auto", "ort_fp16_iobinding+efficient"}
    assert logits["ort_fp16_iobinding+auto"].shape == (2, 32, 2)
    assert all("logits" not in row for row in ak["kernels"].values())


def test_smoke_test_in_a_child_process(splade_dir):
    """gpu.py's smoke test of a new layout (one call of 20 and of 1 candidate in a child process, finite
    logits), here on the CPU provider with the padded export."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu = pytest.importorskip("gpu")
    out = gpu.smoke_in_child(splade_dir, "cpu", "iobinding", timeout_s=300)
    assert out["pop20_finite"] and out["pop1_finite"] and out["pop20_first_call_s"] > 0
    assert 0.0 <= out["dev_metric"] <= 1.0 and 0.0 <= out["test_metric"] <= 1.0  # a tune's evaluation shapes ran


def test_tunes_use_a_short_kernel_layout_only_after_its_edge_length_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu = pytest.importorskip("gpu")
    ok, bad = {"ok": True}, {"ok": False}
    assert gpu.layout_usable("flash", True, "cuda", None)  # ORT's kernels: parity alone
    assert not gpu.layout_usable("flash", False, "cuda", ok)
    ok = {"ok": True, "ok_impl": {"1": True, "2": True}}
    bad = {"ok": False, "ok_impl": {"1": False, "2": False}}
    for kernel in ("short", "short_qkv", "pipe_qkv"):
        assert gpu.layout_usable(kernel, True, "cuda", ok)
        assert not gpu.layout_usable(kernel, True, "cuda", bad)
        assert not gpu.layout_usable(kernel, True, "cuda", {"ok": True})  # a check that did not cover its impl
        assert not gpu.layout_usable(kernel, True, "cuda", None)  # the check crashed or did not run
        assert not gpu.layout_usable(kernel, False, "cuda", ok)
        assert gpu.layout_usable(kernel, True, "cpu", None)  # the CPU dry run has no such check
    one = {"ok": False, "ok_impl": {"1": True, "2": False}}  # impl 2 failed: only its layouts are left out
    assert gpu.layout_usable("short_qkv", True, "cuda", one) and not gpu.layout_usable("pipe_qkv", True, "cuda", one)


def test_concurrent_graphs_asked_without_the_cell():
    """--concurrent-graphs on/off skips the 20 s cell (the card's time is short) and says so in the report."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu = pytest.importorskip("gpu")
    assert gpu.parse_args([]).concurrent_graphs == "measure"
    assert gpu.parse_args(["--concurrent-graphs", "on"]).concurrent_graphs == "on"
    data = json.loads((ROOT / "benchmarks" / "results" / "gpu_nvidia-h100-80gb-hbm3_qkv.json").read_text())
    assert "clip tune ran them at once" in gpu.markdown(data)  # run 10 measured it
    data["concurrent_graphs"] = {"asked": "on", "used_for_clip": True, "measured": False}
    md = gpu.markdown(data)
    assert "clip's K graph calls: at once, as asked (--concurrent-graphs on; not measured here)" in md
    assert "at once (a thread each)" not in md
