"""The prompt projection as a tiny ONNX graph, shipped with the runtime as a package asset.

``prompt = Reshape(Cast(z @ At), shape)``: candidates z [pop, d] float32 and the fixed random
projection At [d, L*hidden] float32 (BBT's A, transposed; resident on the device) give the prompts
[pop, L, hidden] in the graphs' dtype. The runtime (``cliptune_ort.engine.Engine.project``) runs it
on the engine's device and binds its output straight to the thinned graphs' ``prompt_embeds``
input, so a CUDA run never computes the projection with numpy nor copies prompts host -> device.

The graphs hold no weights and are identical for every model, so they are built here once and
committed as ``cliptune_ort/assets/projection/projection_{fp32,fp16}.onnx`` (the runtime does not
depend on ``onnx``). Rebuild them with ``python -m cliptune_export.projection``;
``tests/test_projection.py`` checks the committed bytes equal what this module builds.

Beside them, ``cast_fp16.onnx``: one Cast float32 -> float16, which an Engine whose graphs take float16 prompts
(``prompt_dtype: float16``) runs on the CPU provider for prompts that come from the host
(``cliptune_ort.engine.host_cast``). ONNX Runtime's CPU Cast converts with MLAS's vectorised routine, numpy's
``astype(float16)`` one element at a time: 20 candidates' prompts (20 x 50 x 1024) took 0.10 against 2.7 ms on
the 2-core machine, with the same bits.
"""

from __future__ import annotations

from pathlib import Path

#: where the runtime loads them from (cliptune_ort/engine.py PROJECTION_DIR)
ASSET_DIR = Path(__file__).resolve().parents[1] / "cliptune_ort" / "assets" / "projection"
DTYPES = ("fp32", "fp16")
#: fixed so the committed bytes do not change with the installed onnx version
IR_VERSION = 8
OPSET = 13


def projection_model(dtype: str) -> bytes:
    """The serialized projection graph whose ``prompt`` output is float32 (``fp32``) or float16 (``fp16``)."""
    from onnx import TensorProto, helper

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out_type = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["z", "at"], ["flat"], name="project")]
    flat = "flat"
    if dtype == "fp16":
        nodes.append(helper.make_node("Cast", ["flat"], ["flat_half"], name="to_half", to=TensorProto.FLOAT16))
        flat = "flat_half"
    nodes.append(helper.make_node("Reshape", [flat, "shape"], ["prompt"], name="to_prompt"))
    graph = helper.make_graph(
        nodes, f"cliptune_projection_{dtype}",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["pop", "d"]),
         helper.make_tensor_value_info("at", TensorProto.FLOAT, ["d", "prompt_size"]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("prompt", out_type, ["pop", "n_prompt", "hidden"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cliptune_export.projection")
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def asset_path(dtype: str, root: Path = ASSET_DIR) -> Path:
    return Path(root) / f"projection_{dtype}.onnx"


#: the host cast graph's file name (cliptune_ort/engine.py CAST_PATH)
CAST_NAME = "cast_fp16.onnx"


def cast_model() -> bytes:
    """The serialized graph ``y = Cast(x, to=float16)``, x float32 of any shape."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], name="to_half", to=TensorProto.FLOAT16)], "cliptune_cast_fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cliptune_export.projection")
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def write_assets(root: Path = ASSET_DIR) -> list[Path]:
    """(Re)write both projection graphs and the host cast graph under ``root``; returns their paths."""
    from cliptune_ort.fileio import atomic_write_bytes

    Path(root).mkdir(parents=True, exist_ok=True)
    paths = []
    for dtype in DTYPES:
        path = asset_path(dtype, root)
        atomic_write_bytes(path, projection_model(dtype))
        paths.append(path)
    atomic_write_bytes(Path(root) / CAST_NAME, cast_model())
    paths.append(Path(root) / CAST_NAME)
    return paths


if __name__ == "__main__":
    for p in write_assets():
        print(p)
