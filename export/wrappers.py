"""Small modules that give each exported component the I/O of docs/architecture.md
("Exported components").

All take and return tensors only (what torch.onnx.export traces). The UNet wrapper does Eq. 6
inside, with SD2.1's alphas_cumprod table and its interpolation in the graph; for a baked tau
the table lookup and the time embedding become constants.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sodiff import base as base_mod
from sodiff.schedule import interp_alpha, x0_from_eps

from .islands import Island, install
from .specs import ComponentSpec

EQ6 = Island("", "Eq. 6 and the alphas_cumprod table: computed by the wrapper in float32 "
                 "(near tau = 0, 1 - a(tau) is below float16's resolution around 1)")


class SaipeWrapper(nn.Module):
    """image [B,3,S,S] -> prompt [B,77,D] (the reconstruction branch is dead code here)."""

    def __init__(self, saipe: nn.Module):
        super().__init__()
        self.saipe = saipe

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.saipe(image)[0]


class PredictorWrapper(nn.Module):
    """image [B,3,H,W] at native resolution -> (timestep [B], qf [B]), deterministic."""

    fp32_islands = (
        Island("predictor.timestep_head", "tau = sum_i i * softmax(logits)_i over T_max "
               "candidates up to T_max - 1: float16 would round tau by up to 0.5", "float32"),
        Island("predictor.qf_head", "QF = qf_init + qf_scale * head(features) is a float32 "
               "output in QF units", "float32"))

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau, qf, _ = self.predictor(image, gumbel=False)
        return tau.float(), qf.float()


class EncoderWrapper(nn.Module):
    """image -> posterior mean times the scaling factor (no sampling op in the graph)."""

    def __init__(self, vae: nn.Module, scaling: float):
        super().__init__()
        self.vae, self.scaling = vae, scaling

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return base_mod.encode_mean(self.vae, image, self.scaling)


class DecoderWrapper(nn.Module):
    """clean latent -> image (divides by the scaling factor inside)."""

    def __init__(self, vae: nn.Module, scaling: float):
        super().__init__()
        self.vae, self.scaling = vae, scaling

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return base_mod.decode(self.vae, latent, self.scaling)


def _unet_dtype(unet: nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


class UNetWrapper(nn.Module):
    """(latent, timestep, prompt) -> Eq. 6's clean latent; `SODiff.denoise` as a graph.

    Eq. 6 and the table stay float32 even in a float16 copy: near tau = 0, 1 - a(tau) is below
    float16's resolution around 1, and sqrt(1 - a) would round to 0.
    """

    keep_fp32 = ("alphas_cumprod",)
    fp32_islands = (
        EQ6,
        Island("unet.time_embedding", "the sinusoidal timestep embedding (arguments up to 999 "
               "rad, where float16 steps 0.5 rad) and its projection"))

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor
                ) -> torch.Tensor:
        dt = _unet_dtype(self.unet)
        eps = self.unet(latent.to(dt), timestep.float(),
                        encoder_hidden_states=prompt.to(dt)).sample
        alpha = interp_alpha(self.alphas_cumprod, timestep)
        return x0_from_eps(latent.float(), eps.float(), alpha)


class ConstantTimeEmbedding(nn.Module):
    """Stands in for the UNet's `time_embedding` when tau is baked: returns the embedding of
    tau computed once, [1, D], which broadcasts over the batch. The sinusoidal projection feeding
    it becomes dead code, and every resnet's projection of it folds to a constant."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.register_buffer("embedding", embedding.detach().clone())

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.embedding.to(sample.dtype)


class FixedUNetWrapper(nn.Module):
    """(latent, prompt) -> Eq. 6's clean latent at a baked tau (no timestep input).

    Takes ownership of `unet`: its `time_embedding` is replaced by the constant embedding of
    tau, so pass a copy you no longer need otherwise (the export's merged copy).
    """

    keep_fp32 = ("timestep", "alpha")
    fp32_islands = (EQ6,)

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, tau: float):
        super().__init__()
        t = torch.tensor([float(tau)], dtype=torch.float32)
        with torch.no_grad():
            t_emb = unet.time_proj(t).to(_unet_dtype(unet))
            embedding = unet.time_embedding(t_emb)
        unet.time_embedding = ConstantTimeEmbedding(embedding)
        self.unet, self.tau = unet, float(tau)
        self.register_buffer("timestep", t)
        self.register_buffer("alpha", interp_alpha(alphas_cumprod.detach().float(), t))

    def forward(self, latent: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        dt = _unet_dtype(self.unet)
        eps = self.unet(latent.to(dt), self.timestep, encoder_hidden_states=prompt.to(dt)).sample
        return x0_from_eps(latent.float(), eps.float(), self.alpha)


class CastIO(nn.Module):
    """Casts inputs to the inner module's compute dtype and outputs to the spec's I/O dtypes:
    float16 at the boundaries of a float16 component, float32 for timestep/qf."""

    def __init__(self, inner: nn.Module, spec: ComponentSpec, precision: str,
                 compute: torch.dtype):
        super().__init__()
        self.inner, self.spec, self.precision, self.compute = inner, spec, precision, compute

    def forward(self, *args: torch.Tensor):
        args = tuple(a.to(self.compute) if t.follows_precision else a.float()
                     for a, t in zip(args, self.spec.inputs))
        out = self.inner(*args)
        outs = out if isinstance(out, tuple) else (out,)
        outs = tuple(o.to(getattr(torch, t.dtype(self.precision)))
                     for o, t in zip(outs, self.spec.outputs))
        return outs if isinstance(out, tuple) else outs[0]


def half_copy(module: nn.Module, islands: tuple[Island, ...] = ()) -> nn.Module:
    """A float16 copy of `module`, except the buffers its submodules list in `keep_fp32`
    (copied back from the float32 original, so nothing is rounded through float16) and the
    float32 islands: `module.fp32_islands` plus `islands` (e.g. those the FP16-safety tracking
    flagged), each a float32 copy of the original's submodule with casts at its boundary."""
    half = copy.deepcopy(module).half()
    for name, sub in module.named_modules():
        for buf in getattr(sub, "keep_fp32", ()):
            target = half.get_submodule(name) if name else half
            setattr(target, buf, getattr(sub, buf).detach().clone())
    install(half, module, list(fp32_islands(module, islands)))
    return half


def fp32_islands(wrapper: nn.Module, flagged: tuple[Island, ...] = ()) -> tuple[Island, ...]:
    """Every float32 island of `wrapper`'s fp16 graph: the declared ones, then `flagged`."""
    return (*getattr(wrapper, "fp32_islands", ()), *flagged)


def build_wrappers(model: nn.Module, names: tuple[str, ...], tau: float | None
                   ) -> dict[str, nn.Module]:
    """float32 wrappers of `names` around `model` (a SODiff whose LoRA is merged), in eval mode.
    `tau` not None: the UNet wrapper bakes it (and takes ownership of `model.unet`)."""
    s = model.cfg.scaling_factor
    make = {
        "saipe": lambda: SaipeWrapper(model.saipe),
        "predictor": lambda: PredictorWrapper(model.predictor),
        "vae_encoder": lambda: EncoderWrapper(model.vae, s),
        "unet": lambda: (UNetWrapper(model.unet, model.alphas_cumprod) if tau is None
                         else FixedUNetWrapper(model.unet, model.alphas_cumprod, tau)),
        "vae_decoder": lambda: DecoderWrapper(model.vae, s),
    }
    return {n: make[n]().eval() for n in names}


def for_export(wrapper: nn.Module, spec: ComponentSpec, precision: str,
               islands: tuple[Island, ...] = ()) -> nn.Module:
    """The module to trace: as is for fp32; for fp16, float16 I/O around a float16 copy with
    float32 islands -- the same genuinely half graph for onnxruntime and for TensorRT, which
    parses it strongly typed (its dtypes are the engine's precisions)."""
    if precision != "fp16":
        return wrapper
    return CastIO(half_copy(wrapper, islands), spec, precision, torch.float16).eval()
