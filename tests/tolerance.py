"""The test suite's one tolerance policy for comparing floating-point results.

Two runs of the same float computation differ in the last bits between CPUs: ATen picks
default, AVX2 or AVX-512 kernels (`ATEN_CPU_CAPABILITY`), oneDNN and onnxruntime block their
reductions differently, and the thread count changes the order of sums. Those differences are
rounding errors, so they are bounded by

    |got - want| <= atol + rtol * |want|,   rtol = SAFETY * eps(dtype) * depth,
                                            atol = rtol * scale

- `eps(dtype)` is the unit roundoff's spacing of the computation's lowest precision
  (2**-23 for float32, 2**-10 for float16, 2**-52 for float64);
- `depth` is how many rounding stages stack up on the way: 1 for an elementwise op, about 1 per
  layer (convolution, matmul, norm, attention) along the longest path for a network. Each
  stage's error is a few eps relative to the values it works at, and the stages add up;
- `scale` is the magnitude the computation works at, by default the reference's largest
  |value|: a deep network's error scales with its activations, so an output element near zero
  carries as much absolute error as the largest one.

SAFETY leaves room for CPUs we have not seen. Each parity test keeps the error it measures here
at least 10x below its bound, and a real defect (a LoRA left unmerged, a weight scaled by
1 + 1e-3, the wrong timestep) at least 10x above it: `excess` gives the ratio, and the defect
tests in tests/test_export_wrappers.py assert it. Set SODIFF_TOLERANCE_LOG=path to append each
comparison's error, bound and ratio as a JSON line (how the closing notes list them).

Exact results (bit-identical saves, integer pixels) are compared exactly or with
`assert_pixels_close`, never with this policy.
"""
from __future__ import annotations

import json
import os

import numpy as np

SAFETY = 4  # on top of eps * depth; the measured errors sit 10x below, defects 10x above

EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7,
       "float16": 2.0 ** -10}

# Depths used across the suite, so that the same computation gets the same bound everywhere.
ELEMENTWISE = 1   # one op on each value
LAYER = 4         # one reduction, resize, DCT, or convolution/linear/attention with its norm
NETWORK = 16      # a tiny preset's component end to end (UNet, VAE, SAIPE, predictor)
PIPELINE = 64     # components chained (encode, denoise, decode), or another runtime's kernels


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch stays optional for runtime-only tests
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _dtype_name(*xs) -> str:
    """The lowest float precision among the inputs (float32 when none is a float)."""
    names = []
    for x in xs:
        name = str(getattr(x, "dtype", "float32")).replace("torch.", "")
        names.append(name if name in EPS else "float32")
    return max(names, key=lambda n: EPS[n])


def bound(want, depth: int, dtype: str | None = None, scale: float | None = None
          ) -> tuple[float, float]:
    """(rtol, atol) of the policy for a reference `want` computed `depth` stages deep."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rtol = SAFETY * EPS[dtype or _dtype_name(want)] * depth
    ref = _numpy(want).astype(np.float64)
    if scale is None:
        scale = float(np.abs(ref).max()) if ref.size else 0.0
    return rtol, rtol * max(scale, np.finfo(np.float32).tiny)


def excess(got, want, depth: int, dtype: str | None = None, scale: float | None = None,
           _kind: str = "excess") -> float:
    """max |got - want| / (atol + rtol |want|): <= 1 passes, a defect should give >= 10."""
    rtol, atol = bound(want, depth, dtype or _dtype_name(got, want), scale)
    a, b = _numpy(got).astype(np.float64), _numpy(want).astype(np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} against {b.shape}")
    ratio = float((np.abs(a - b) / (atol + rtol * np.abs(b))).max()) if b.size else 0.0
    _log(_kind, float(np.abs(a - b).max()) if b.size else 0.0, atol, ratio)
    return ratio


def assert_close(got, want, depth: int, dtype: str | None = None, scale: float | None = None,
                 msg: str = "") -> None:
    """`got` equals `want` up to the rounding of a `depth`-stage computation in `dtype`."""
    excess(got, want, depth, dtype, scale, "close")  # logs the ratio when asked to
    rtol, atol = bound(want, depth, dtype or _dtype_name(got, want), scale)
    np.testing.assert_allclose(_numpy(got).astype(np.float64), _numpy(want).astype(np.float64),
                               rtol=rtol, atol=atol, equal_nan=False,
                               err_msg=f"{msg} (depth {depth})")


def assert_differs(got, want, depth: int, dtype: str | None = None, scale: float | None = None,
                   factor: float = 10.0, msg: str = "") -> None:
    """`got` is at least `factor` times the policy's bound away from `want`: what a real
    difference (a defect, another input) must look like for the bound to catch it."""
    ratio = excess(got, want, depth, dtype, scale, "differs")
    if not ratio >= factor:
        raise AssertionError(f"{msg + ': ' if msg else ''}only {ratio:.3g}x the bound apart "
                             f"(depth {depth}); a real difference must be >= {factor}x")


def assert_pixels_close(got, want, levels: int = 0, msg: str = "") -> None:
    """Integer images equal to within `levels` grey levels (rounding of the last step)."""
    a, b = np.asarray(got).astype(np.int64), np.asarray(want).astype(np.int64)
    if a.shape != b.shape:
        raise AssertionError(f"{msg + ': ' if msg else ''}shapes differ: {a.shape} / {b.shape}")
    np.testing.assert_allclose(a, b, rtol=0, atol=levels, err_msg=msg)


def _log(kind: str, diff: float, atol: float, ratio: float) -> None:
    path = os.environ.get("SODIFF_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"), "kind": kind,
                                "max_abs": diff, "atol": atol, "ratio": ratio}) + "\n")
