"""Does onnxruntime run a float16 graph on the GPU? gpu_check.sh asks before its onnxruntime
columns: exit 0 when a tiny float16 MatMul + Add runs on CUDAExecutionProvider through IO
binding (device OrtValues in and out, as the runtime's backend binds them) and matches numpy;
exit 1, with the reason on one line, otherwise.

    python benchmarks/ort_smoke.py         the CUDA provider (preloading CUDA/cuDNN from the
                                           machine's nvidia-* packages)
    python benchmarks/ort_smoke.py --cpu   the same binding code on the CPU provider
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `runtime.version` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.version import version_line  # noqa: E402 (standard library only)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def tiny_fp16_graph() -> bytes:
    """y = x @ w + b in float16, x [2, 8] -> y [2, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float16), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"],
                                                                          ["y"])],
        "smoke", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def check(device: str) -> str:
    """'' when the graph ran on `device` ("cuda" or "cpu") and matched, else why not."""
    import onnx
    import onnxruntime as ort

    provider = CUDA if device == "cuda" else CPU
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, without importing torch
    print(f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}")
    if provider not in ort.get_available_providers():
        return f"this onnxruntime has no {provider} (install onnxruntime-gpu; docs/gpu.md)"
    data = tiny_fp16_graph()
    sess = ort.InferenceSession(data, providers=[provider])
    if sess.get_providers()[0] != provider:
        return f"the session fell back to {sess.get_providers()} (CUDA or cuDNN did not load)"
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float16)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output("y", device)
    sess.run_with_iobinding(binding)
    out = binding.get_outputs()[0]
    if out.device_name().lower() != device:
        return f"the output lives on {out.device_name()}, not {device}"
    g = onnx.load_from_string(data).graph
    w, b = (onnx.numpy_helper.to_array(t).astype(np.float32) for t in g.initializer)
    want = x.astype(np.float32) @ w + b
    err = float(np.abs(out.numpy().astype(np.float32) - want).max())
    if not err <= 1e-2 * max(1.0, float(np.abs(want).max())):
        return f"float16 result off by {err:.3g}"
    print(f"float16 MatMul+Add on {provider} through IO binding: max error {err:.2g}")
    return ""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU provider instead of CUDA")
    p.add_argument("--version", action="version", version=version_line("ort_smoke.py"))
    device = "cpu" if p.parse_args(argv).cpu else "cuda"
    try:
        problem = check(device)
    except Exception as e:  # noqa: BLE001 - any import/load/run failure: say it in one line
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
    if problem:
        print(f"onnxruntime on {device}: {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
