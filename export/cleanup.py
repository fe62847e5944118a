"""Graph clean-up after torch.onnx.export: constant folding (polygraphy, onnx-graphsurgeon
underneath), dead-node and unused-initializer removal, topological order, shape inference.
Graphs over protobuf's 2 GB limit are written with one external data file beside them."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

PROTOBUF_LIMIT = 2 ** 31        # bytes: protobuf cannot serialize a message this large
EXTERNAL_MARGIN = 64 * 2 ** 20  # headroom for the graph itself next to the weights
EXTERNAL_SIZE_THRESHOLD = 1024  # tensors at least this large go to the data file


def data_file_name(model_file: str) -> str:
    """The external data file beside `model_file` (engine-dir.md: `unet.onnx.data`)."""
    return f"{model_file}.data"


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (external ones counted by their declared length)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += t.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: Path) -> str | None:
    """Write `model` to `path`; over 2 GB, its tensors go to one data file beside it, whose
    name is returned (None when the graph is self-contained)."""
    path = Path(path)
    if tensor_bytes(model) + EXTERNAL_MARGIN < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return None
    data = data_file_name(path.name)
    (path.parent / data).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=EXTERNAL_SIZE_THRESHOLD)
    # onnx creates the data file owner-only; give it the permissions the graph file got.
    os.chmod(path.parent / data, path.stat().st_mode & 0o777)
    return data


def _quiet() -> None:
    """Folding runs onnxruntime sessions whose optimizer warnings are noise here."""
    import onnxruntime
    from polygraphy.logger import G_LOGGER
    onnxruntime.set_default_logger_severity(3)
    G_LOGGER.module_severity = G_LOGGER.ERROR
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)


def drop_identity_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Cast nodes to the dtype their input already has (the tracer emits one for every
    `.to(dtype)`, needed or not: in a half graph, at every boundary and attention block)."""
    import numpy as np
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    outputs = {id(t) for t in graph.outputs}
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "Cast" and id(node.outputs[0]) not in outputs:
            src, dst = node.inputs[0], node.outputs[0]
            to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
            if src.dtype is None or np.dtype(src.dtype) != to:
                continue
            for consumer in list(dst.outputs):
                for i, t in enumerate(list(consumer.inputs)):
                    if t is dst:
                        consumer.inputs[i] = src
            node.outputs.clear()
            dropped += 1
    if not dropped:
        return model
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def cleanup(src: Path, dst: Path) -> dict:
    """Fold constants, drop dead nodes, infer shapes: `src` (a raw export, possibly with
    torch's many external files) -> `dst`. Returns counts for the progress output.

    polygraphy's fold_constants runs onnx-graphsurgeon's fold and cleanup (dead nodes, unused
    initializers) pass after pass, with shape inference between passes (which turns Shape ops
    of static dims into constants that fold further), until the node count stops changing.
    It gets a loader rather than a model so that it holds the only copy (graphs of many GB).
    """
    from polygraphy.backend.onnx import fold_constants

    _quiet()
    before = len(onnx.load(str(src), load_external_data=False).graph.node)
    model = fold_constants(lambda: onnx.load(str(src)), num_passes=None,
                           do_shape_inference=True, error_ok=False, copy=False)
    model = drop_identity_casts(model)
    after = len(model.graph.node)
    data = save_model(model, dst)
    del model
    # By path: works for graphs over 2 GB too (external data is not loaded).
    onnx.shape_inference.infer_shapes_path(str(dst), str(dst))
    return {"nodes_before": before, "nodes_after": after, "external_data": data}
