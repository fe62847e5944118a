"""The onnxruntime and TensorRT side of the latency benchmark: an engine dir opened by the
torch-free runtime's own backends (`runtime.backends.open_engines`), so the numbers are what
`sodiff-run` gets; the same component inputs as the PyTorch side; the pipeline as the runtime
chains the components: numpy resize for SAIPE, then the device-resident path (`put` / `run` /
`fetch`: IO binding on onnxruntime, so the prompt, tau and latents stay on the GPU and only the
image goes in and the restored image comes out; CUDA graphs on static dirs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._common import PIPELINE

# Component inputs in the order the PyTorch side passes them (docs/engine-dir.md names).
INPUT_ORDER = {"saipe": ("image",), "predictor": ("image",), "vae_encoder": ("image",),
               "unet": ("latent", "timestep", "prompt"), "vae_decoder": ("clean_latent",)}
RUNTIME_BACKEND = {"ort": "ort", "trt": "trt"}  # benchmark kind -> RestoreOptions.backend


def read_manifest(engine_dir: Path) -> dict[str, Any]:
    """The raw manifest JSON (ValueError when the dir has none)."""
    path = Path(engine_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{engine_dir} is not an engine dir: manifest.json is missing "
                         f"(export one with sodiff-export)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


class EngineRunner:
    """The components of one engine dir on the runtime's onnxruntime or TensorRT backend."""

    def __init__(self, engine_dir: Path, kind: str, device: str, threads: int | None = None):
        from runtime.backends import open_engines
        from runtime.config import RestoreOptions
        from runtime.manifest import read_manifest as runtime_manifest
        self.manifest = runtime_manifest(engine_dir)  # checks format, files and hashes
        # TensorRT engines always run on the GPU; onnxruntime gets the benchmark's device.
        opts = RestoreOptions(backend=RUNTIME_BACKEND[kind],
                              device="auto" if kind == "trt" else device, threads=threads or 0)
        self.engines = open_engines(self.manifest, opts)
        self.predicted = self.manifest.predicted

    def close(self) -> None:
        self.engines.close()

    def measured(self, name: str) -> bool:
        return name in self.engines or name == PIPELINE

    def _feeds(self, name: str, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        wanted = [t.name for t in self.engines[name].spec.inputs]
        named = dict(zip(INPUT_ORDER[name], arrays))
        return {k: named[k] for k in wanted}  # the runtime casts to each input's dtype

    def run(self, name: str, **tensors) -> dict:
        """One component on device-resident tensors (`put` by input name, or upstream)."""
        comp = self.engines[name]
        return comp.run(**{k: t if not isinstance(t, np.ndarray) else comp.put(k, t)
                           for k, t in tensors.items()})

    def pipeline(self, image: np.ndarray) -> np.ndarray:
        """The whole restoration of a batch [B,3,H,W] in [-1, 1], as the runtime chains it:
        host data in once per component that reads the image, the restored batch out."""
        from runtime.resize import resize
        s = self.manifest.saipe_size
        small = np.stack([resize(img, (s, s)) for img in image]) if image.shape[-2:] != (s, s) \
            else image
        prompt = self.run("saipe", image=small)["prompt"]
        latent = self.run("vae_encoder", image=image)["latent"]
        if self.predicted:
            tau = self.run("predictor", image=image)["timestep"]
        else:
            tau = np.full((image.shape[0],), self.manifest.timestep_value, np.float32)
        feeds = {"latent": latent, "prompt": prompt, **({"timestep": tau} if self.predicted
                                                        else {})}
        clean = self.run("unet", **feeds)["clean_latent"]
        dec = self.engines["vae_decoder"]
        return np.clip(dec.fetch(self.run("vae_decoder", clean_latent=clean)["image"]), -1, 1)

    def callable(self, name: str, inputs: dict[str, tuple[np.ndarray, ...]]
                 ) -> Callable[[], Any]:
        """A timed call: the pipeline from host to host, or one component on inputs uploaded
        beforehand (its device time, outputs left on the device as the pipeline leaves them)."""
        args = inputs[name]
        if name == PIPELINE:
            return lambda: self.pipeline(*args)
        comp = self.engines[name]
        feeds = {k: comp.put(k, v) for k, v in self._feeds(name, args).items()}
        return lambda: comp.run(**feeds)


def numpy_inputs(torch_inputs: dict[str, tuple[Any, ...]]) -> dict[str, tuple[np.ndarray, ...]]:
    """The PyTorch side's (fp32) inputs as numpy arrays: every backend sees the same data."""
    return {k: tuple(np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in v)
            for k, v in torch_inputs.items()}
