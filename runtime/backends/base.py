"""What every backend shares (the package's API re-exports it): the Backend interface, the
Tensor passed between calls, and the install checks. ort.py and trt.py import it from here, so
the package imports them without a cycle."""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..manifest import ComponentSpec

GPU_EXTRA = "pip install 'sodiff[gpu]' (never together with the runtime extra)"


@dataclass(frozen=True)
class Tensor:
    """A component input or output between calls."""

    value: Any                    # np.ndarray (host path) or an onnxruntime OrtValue (bound)
    dtype: np.dtype               # its element type: the graph's, never silently float32
    shape: tuple[int, ...]
    stable: bool = False          # memory that lives as long as its backend (a fixed-io
    #                               buffer): safe to bind by address for a CUDA graph

    @property
    def on_host(self) -> bool:
        return isinstance(self.value, np.ndarray)

    def to_host(self) -> np.ndarray:
        """A host copy (an OrtValue's numpy() is a view of memory the next run overwrites)."""
        return np.array(self.value if self.on_host else self.value.numpy(), copy=True)


def host_tensor(array: np.ndarray) -> Tensor:
    return Tensor(array, array.dtype, tuple(array.shape))


class Backend(ABC):
    """One component's model on one execution engine."""

    name = "backend"
    binds = False                 # True: upload/run_bound/download keep tensors on the device

    def __init__(self, spec: ComponentSpec):
        self.spec = spec

    @abstractmethod
    def load(self) -> None:
        """Read the model file and prepare to run it."""

    @abstractmethod
    def allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Prepare buffers for inputs of these shapes (called when the shapes change)."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; `feeds` already have the component's dtypes. Returns host arrays."""

    @abstractmethod
    def close(self) -> None:
        """Free sessions, engines and buffers; the backend is unusable afterwards."""

    def graph_io(self) -> dict[str, tuple[str, tuple]]:
        """What the loaded model itself declares, per input and output: (dtype name, shape
        with None for a dim it leaves free). Empty: the backend cannot tell (nothing checked)."""
        return {}

    # The device-resident path, for backends with `binds = True`.
    def upload(self, name: str, array: np.ndarray) -> Tensor:
        """`array` (already in the input's dtype) on the device, for input `name`."""
        raise NotImplementedError(f"{self.name} has no device-resident path")

    def run_bound(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run once on device tensors (from `upload` or an upstream output); outputs stay on
        the device until the next run of this backend overwrites them."""
        raise NotImplementedError(f"{self.name} has no device-resident path")


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
