"""One spec per exported component: I/O names and symbolic shapes (fixed by docs/architecture.md),
dynamic axes, concrete sample shapes, TensorRT profile shapes and the parity tolerance.

Torch-free, so option validation can import it cheaply."""
from __future__ import annotations

from dataclasses import dataclass

COMPONENTS = ("saipe", "predictor", "vae_encoder", "unet", "vae_decoder")

FLOAT16, FLOAT32 = "float16", "float32"
QUANTIZED = ("int8", "fp8")  # 8-bit Q/DQ graphs (export/quantize.py) on a float16 graph
HALF_BASED = frozenset({"fp16", *QUANTIZED})  # precisions whose graphs are float16 around


def base_precision(precision: str) -> str:
    """The float precision a graph is traced in: a quantized graph is a float16 graph (with
    its float32 islands) that Q/DQ pairs are added to."""
    return "fp16" if precision in HALF_BASED else "fp32"
Dim = int | str  # an int is fixed; a string is a symbol: B (batch), H/W (image), h/w (latent)


@dataclass(frozen=True)
class TensorSpec:
    name: str                      # the graph's input/output name
    shape: tuple[Dim, ...]         # fixed ints and symbols
    follows_precision: bool = True  # False: float32 whatever the precision (timestep, qf)

    def dtype(self, precision: str) -> str:
        return FLOAT16 if precision in HALF_BASED and self.follows_precision else FLOAT32

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class Tolerance:
    """Parity passes when max |onnx - torch| <= atol + rtol * max |torch| per output."""

    atol: float  # absolute part
    rtol: float  # part relative to the output's largest magnitude

    def limit(self, ref_max_abs: float) -> float:
        return self.atol + self.rtol * ref_max_abs


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp32_tolerance: Tolerance   # fp32 graphs against the fp32 PyTorch wrapper
    fp16_tolerance: Tolerance   # fp16 graphs (or fp16 I/O) against the same fp32 wrapper

    def tolerance(self, precision: str) -> Tolerance:
        if precision in QUANTIZED:
            return QUANTIZED_TOLERANCE
        return self.fp16_tolerance if precision == "fp16" else self.fp32_tolerance

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes`: every symbolic dim of every I/O tensor."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def io_manifest(self, precision: str) -> dict[str, list[dict]]:
        as_dict = lambda t: {"name": t.name, "dtype": t.dtype(precision),  # noqa: E731
                             "shape": list(t.shape)}
        return {"inputs": [as_dict(t) for t in self.inputs],
                "outputs": [as_dict(t) for t in self.outputs]}

    def profile(self, lo: dict[str, int], opt: dict[str, int], hi: dict[str, int]
                ) -> dict[str, dict[str, list[int]]]:
        """TensorRT optimization-profile shapes of every input."""
        return {t.name: {"min": list(t.concrete(lo)), "opt": list(t.concrete(opt)),
                         "max": list(t.concrete(hi))} for t in self.inputs}


# 8-bit graphs against the fp32 wrapper: a gross check that the graph is the component (a
# broken Q/DQ graph is off by the output's whole scale); what quantization costs is judged by
# the restored images' PSNR (export/quality.py), not by this bound.
QUANTIZED_TOLERANCE = Tolerance(5e-2, 1.5e-1)


def dims(batch: int, size: tuple[int, int], vae_factor: int) -> dict[str, int]:
    """Values of the symbols for a batch and an image size (H, W)."""
    h, w = size
    return {"B": batch, "H": h, "W": w, "h": h // vae_factor, "w": w // vae_factor}


def component_specs(*, saipe_size: int, num_queries: int, prompt_dim: int,
                    latent_channels: int, baked_timestep: bool) -> dict[str, ComponentSpec]:
    """The five components' specs for one model (`baked_timestep`: fixed/calibrated tau)."""
    image = TensorSpec("image", ("B", 3, "H", "W"))
    latent = ("B", latent_channels, "h", "w")
    prompt = TensorSpec("prompt", ("B", num_queries, prompt_dim))
    unet_inputs = (TensorSpec("latent", latent),
                   *(() if baked_timestep else (TensorSpec("timestep", ("B",), False),)),
                   prompt)
    # fp32: float32 rounding of graphs whose ops onnxruntime fuses and reorders, relative to
    # the output's scale (1e-4 ~ a thousand float32 ulps: SD2.1's VAE decoder, 512x512, lands
    # at 5e-5 of its range); the predictor's tau is a 1000-term expectation of values up to 999.
    # fp16: float16's 2^-11 relative rounding compounded over a network's depth.
    return {
        "saipe": ComponentSpec("saipe", (TensorSpec("image", ("B", 3, saipe_size, saipe_size)),),
                               (prompt,), Tolerance(1e-4, 1e-4), Tolerance(2e-2, 2e-2)),
        "predictor": ComponentSpec("predictor", (image,),
                                   (TensorSpec("timestep", ("B",), False),
                                    TensorSpec("qf", ("B",), False)),
                                   Tolerance(1e-4, 1e-6), Tolerance(1e-1, 5e-3)),
        "vae_encoder": ComponentSpec("vae_encoder", (image,), (TensorSpec("latent", latent),),
                                     Tolerance(1e-4, 1e-4), Tolerance(2e-2, 2e-2)),
        "unet": ComponentSpec("unet", unet_inputs, (TensorSpec("clean_latent", latent),),
                              Tolerance(1e-4, 1e-4), Tolerance(2e-2, 2e-2)),
        "vae_decoder": ComponentSpec("vae_decoder", (TensorSpec("clean_latent", latent),),
                                     (image,), Tolerance(1e-4, 1e-4), Tolerance(2e-2, 2e-2)),
    }
