"""onnxruntime backend: CPU, and the CUDA / TensorRT execution providers of onnxruntime-gpu.

Two ways to run a component: `infer` (numpy in and out through `session.run`) and IO binding
(`upload`, `run_bound`), where inputs and outputs are OrtValues on the provider's device --
"cuda" with the CUDA or TensorRT provider, "cpu" otherwise. The binding code is the same for
both, which is how CI tests it. Static engine dirs (`fixed_io`) bind pre-allocated buffers, one
set per input-shape set, and refill inputs in place; with the CUDA provider each set is also a
CUDA graph (`enable_cuda_graph`, one `gpu_graph_id` per set), which onnxruntime replays from
those same addresses (docs: "Using CUDA Graphs" in the CUDA execution provider page).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, EngineDirError
from ..manifest import ComponentSpec
from .base import GPU_EXTRA, Backend, Tensor

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# onnxruntime's type strings of the dtypes a manifest may name
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
DEVICE_ID = 0                    # the GPU the providers and OrtValues use
GRAPH_OPTION = "enable_cuda_graph"  # CUDA provider option: capture and replay CUDA graphs
GRAPH_ID = "gpu_graph_id"        # run option naming which captured graph a run replays; ids
#                                  start at 1 (0 is onnxruntime's own default, -1 turns it off)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sodiff" / "ort-tensorrt"


def providers_for(device: str) -> list:
    """onnxruntime providers for `device` (auto, cpu, cuda, tensorrt), refusing missing ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu" or (device == "auto" and CUDA not in available):
        return [CPU]
    if device in ("auto", "cuda"):
        if CUDA not in available:
            raise BackendError(f"--device cuda: this onnxruntime has no CUDA provider (it has "
                               f"{', '.join(available)}); {GPU_EXTRA}")
        return [CUDA, CPU]
    if TRT not in available:
        raise BackendError(f"--device tensorrt: this onnxruntime has no TensorRT provider (it has "
                           f"{', '.join(available)}); {GPU_EXTRA}")
    # onnxruntime builds TensorRT engines when a session opens; the cache makes that once.
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(_cache_dir()),
               "trt_fp16_enable": True}
    return [(TRT, options), CUDA, CPU]


def _name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def bind_device(providers) -> str:
    """Where bound OrtValues live: on the GPU when a GPU provider runs the graph first."""
    return "cuda" if providers and _name(providers[0]) in (CUDA, TRT) else "cpu"


def session_providers(providers, fixed_io: bool) -> list:
    """The providers a session opens with: CUDA-graph capture on the CUDA provider when the
    shapes are fixed (a captured graph replays fixed shapes at fixed addresses), never on
    the CPU or TensorRT providers (TensorRT's engines are not CUDA-EP graphs)."""
    out = list(providers)
    if fixed_io and out and _name(out[0]) == CUDA:
        options = dict(out[0][1]) if isinstance(out[0], tuple) else {}
        out[0] = (CUDA, {**options, GRAPH_OPTION: "1"})
    return out


def captures_graphs(providers) -> bool:
    return bool(providers) and isinstance(providers[0], tuple) and \
        str(providers[0][1].get(GRAPH_OPTION, "0")) == "1"


@dataclass(frozen=True)
class OrtConfig:
    providers: tuple              # providers_for(...)'s list, in priority order
    threads: int = 0              # intra-op threads; 0: onnxruntime decides
    fixed_io: bool = False        # static dir: pre-allocated bindings per shape set (and CUDA
    #                               graphs on CUDA); dynamic dirs let onnxruntime allocate
    vae_factor: int = 1           # pixels per latent cell, to size outputs from input shapes


@dataclass
class _BoundSet:
    """One input-shape set of a fixed-io session: its binding, buffers and graph id."""

    binding: Any                  # onnxruntime IOBinding, bound once
    inputs: dict[str, Tensor]     # what each input is bound to (ours or an upstream buffer)
    outputs: dict[str, Tensor]    # pre-allocated outputs, overwritten by every run
    run_options: Any = None       # RunOptions naming this set's CUDA graph, or None
    own: set = field(default_factory=set)  # inputs whose bound buffer this backend allocated


class OrtBackend(Backend):
    name = "ort"
    binds = True

    def __init__(self, spec: ComponentSpec, config: OrtConfig):
        super().__init__(spec)
        self.config = config
        self.device = bind_device(config.providers)
        self.cuda_graph = False   # whether the session captures CUDA graphs (set by load)
        self.graph_note: str | None = None  # why a wanted capture is off (onnxruntime said)
        self.session = None
        self._outputs: list[str] = []
        self._sets: dict[tuple, _BoundSet] = {}
        self._staged: dict[tuple, Tensor] = {}  # fixed io: upload buffers by (name, shape)

    def _open(self, providers: list):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.config.threads
        so.log_severity_level = 3  # errors only: warnings about unused initializers are noise
        try:
            return ort.InferenceSession(str(self.spec.path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise BackendError(f"onnxruntime cannot load {self.spec.path}: "
                               f"{str(e).splitlines()[0]}") from None

    def load(self) -> None:
        providers = session_providers(self.config.providers, self.config.fixed_io)
        try:
            self.session = self._open(providers)
            self.cuda_graph = captures_graphs(providers)
        except BackendError as e:
            if not captures_graphs(providers):
                raise
            # onnxruntime refuses capture for graphs with control flow or nodes the CUDA
            # provider leaves to the CPU; such a graph still runs, bound, without it.
            self.graph_note = str(e)
            self.session = self._open(list(self.config.providers))
        self._check_io()

    def _check_io(self) -> None:
        graph = ({i.name for i in self.session.get_inputs()},
                 {o.name for o in self.session.get_outputs()})
        spec = ({t.name for t in self.spec.inputs}, {t.name for t in self.spec.outputs})
        if graph != spec:
            raise EngineDirError(
                f"engine dir {self.spec.path.parent}: {self.spec.path.name} has inputs "
                f"{sorted(graph[0])} and outputs {sorted(graph[1])}, but the manifest says "
                f"{sorted(spec[0])} and {sorted(spec[1])}; re-export the dir with sodiff-export")
        self._inputs = [t.name for t in self.spec.inputs]
        self._outputs = [t.name for t in self.spec.outputs]
        self._out_dtypes = {t.name: np.dtype(t.dtype) for t in self.spec.outputs}

    def graph_io(self) -> dict[str, tuple[str, tuple | None]]:
        """The session's own input and output types and shapes (None: a free dim)."""
        found = {}
        for arg in (*self.session.get_inputs(), *self.session.get_outputs()):
            dtype = ORT_TYPES.get(arg.type, arg.type)
            shape = None if arg.shape is None else tuple(
                d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
            found[arg.name] = (dtype, shape)
        return found

    def allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        # onnxruntime allocates per run from its arena, which keeps the largest blocks seen:
        # with fixed-size tiles its size no longer grows after the first tile.
        if self.session is None:
            raise BackendError(f"{self.spec.name}: allocate() before load()")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.config.fixed_io:  # a captured session runs bound, numpy callers included
            out = self.run_bound({k: self.upload(k, v) for k, v in feeds.items()})
            return {k: t.to_host() for k, t in out.items()}
        try:
            out = self.session.run(self._outputs, feeds)
        except Exception as e:
            raise self._failed({k: v.shape for k, v in feeds.items()}, e) from None
        return dict(zip(self._outputs, out))

    def _failed(self, shapes: dict, e: Exception) -> BackendError:
        return BackendError(f"onnxruntime failed running {self.spec.name} on {shapes}: "
                            f"{str(e).splitlines()[0]}")

    # -- IO binding ----------------------------------------------------------------------------
    def _new(self, shape: tuple[int, ...], dtype: np.dtype) -> Tensor:
        from onnxruntime import OrtValue

        value = OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, DEVICE_ID)
        return Tensor(value, np.dtype(dtype), tuple(shape), stable=True)

    def upload(self, name: str, array: np.ndarray) -> Tensor:
        from onnxruntime import OrtValue

        if not self.config.fixed_io:  # a fresh OrtValue (on the CPU it wraps `array`)
            return Tensor(OrtValue.ortvalue_from_numpy(array, self.device, DEVICE_ID),
                          array.dtype, tuple(array.shape))
        key = (name, tuple(array.shape))
        if key not in self._staged:
            self._staged[key] = self._new(array.shape, array.dtype)
        staged = self._staged[key]
        staged.value.update_inplace(array)  # same address every time: graphs replay from it
        return staged

    def run_bound(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        shapes = {k: feeds[k].shape for k in self._inputs}
        if not self.config.fixed_io:
            binding = self.session.io_binding()
            for name in self._inputs:
                binding.bind_ortvalue_input(name, feeds[name].value)
            for name in self._outputs:
                binding.bind_output(name, self.device, DEVICE_ID)
            self._run(binding, None, shapes)
            return {n: Tensor(v, self._out_dtypes[n], tuple(v.shape()))
                    for n, v in zip(self._outputs, binding.get_outputs())}
        key = tuple(shapes[k] for k in self._inputs)
        bound = self._sets.get(key) or self._bind(key, shapes, feeds)
        for name in self._inputs:
            self._refill(bound, name, feeds[name])
        self._run(bound.binding, bound.run_options, shapes)
        return dict(bound.outputs)

    def _bind(self, key: tuple, shapes: dict, feeds: dict[str, Tensor]) -> _BoundSet:
        """Bind a new shape set once: stable feeds (upload buffers, upstream outputs of fixed-io
        sessions) by address, anything else through a buffer of ours; outputs pre-allocated."""
        import onnxruntime as ort

        bound = _BoundSet(self.session.io_binding(), {}, {})
        for name in self._inputs:
            t = feeds[name]
            if not (t.stable and not t.on_host):
                t = self._new(t.shape, t.dtype)
                bound.own.add(name)
            bound.inputs[name] = t
            bound.binding.bind_ortvalue_input(name, t.value)
        known = self._symbols(shapes)
        for out in self.spec.outputs:
            bound.outputs[out.name] = self._new(self._resolve(out.shape, known),
                                                self._out_dtypes[out.name])
            bound.binding.bind_ortvalue_output(out.name, bound.outputs[out.name].value)
        if self.cuda_graph:
            bound.run_options = ort.RunOptions()
            bound.run_options.add_run_config_entry(GRAPH_ID, str(len(self._sets) + 1))
        self._sets[key] = bound
        return bound

    def _refill(self, bound: _BoundSet, name: str, feed: Tensor) -> None:
        """Make the bound input hold `feed`: nothing to do when it is the bound buffer."""
        held = bound.inputs[name]
        if feed.value is held.value or (not feed.on_host and
                                        feed.value.data_ptr() == held.value.data_ptr()):
            return
        if name in bound.own:
            held.value.update_inplace(np.ascontiguousarray(feed.to_host()))
        elif not self.cuda_graph:  # no graph remembers the old address: rebind
            bound.inputs[name] = feed
            bound.binding.bind_ortvalue_input(name, feed.value)
        else:
            raise BackendError(f"{self.spec.name}: input {name} arrived at another device "
                               f"address than its CUDA graph was captured with (a runtime "
                               f"bug: bound buffers must be reused); run with "
                               f"io_binding=False to bypass")

    def _symbols(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        known: dict[str, int] = {}
        for t in self.spec.inputs:
            for dim, value in zip(t.shape, shapes[t.name]):
                if isinstance(dim, str):
                    known[dim] = int(value)
        f = self.config.vae_factor
        for big, small in (("H", "h"), ("W", "w")):  # image and latent sides, both ways
            if big in known:
                known.setdefault(small, known[big] // f)
            elif small in known:
                known[big] = known[small] * f
        return known

    def _resolve(self, shape: tuple, known: dict[str, int]) -> tuple[int, ...]:
        try:
            return tuple(known[d] if isinstance(d, str) else int(d) for d in shape)
        except KeyError as e:
            raise EngineDirError(f"engine dir {self.spec.path.parent}: {self.spec.name}'s output "
                                 f"shape {list(shape)} has the symbol {e.args[0]!r}, which no "
                                 f"input determines; re-export the dir with sodiff-export"
                                 ) from None

    def _run(self, binding, run_options, shapes: dict) -> None:
        try:
            self.session.run_with_iobinding(binding, run_options)
        except Exception as e:
            raise self._failed(shapes, e) from None

    @property
    def captured(self) -> int:
        """Bound shape sets so far (CUDA graphs captured, when `cuda_graph`)."""
        return len(self._sets)

    def close(self) -> None:
        self._sets, self._staged = {}, {}
        self.session = None
