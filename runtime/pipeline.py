"""`Restorer`: the SODiff pipeline over an engine dir, in numpy.

decode -> [-1, 1] -> SAIPE prompt (image resized to saipe_size) -> tau (predictor on native
pixels, the manifest's fixed value, or the JPEG header's QF) -> per tile: pad bottom/right,
VAE encoder, UNet, VAE decoder, crop -> feathered blend -> uint. The prompt and tau are computed
once per image; tiles stream through a band of rows, so memory beyond the input and output
arrays does not grow with the image.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import open_engines
from .config import JPEG_BLOCK, LUMA, RestoreOptions, validate_options
from .geometry import Geometry, plan_geometry
from .manifest import Manifest, read_manifest
from .resize import resize_rows
from .tiling import axis_weights, crop_starts, tile_starts

STAGES = ("saipe", "predictor", "vae_encoder", "unet", "vae_decoder")
SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def pad_bottom_right(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Pad [..., H, W] bottom/right: reflect, or edge (replicate) when a pad is not shorter than
    its side -- sodiff.model.pad_reflect's rule, so the JPEG grid stays put."""
    if not ph and not pw:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "edge"
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)], mode=mode)


class _Source:
    """Float [-1, 1] views of parts of a uint image (grey is broadcast to RGB on read)."""

    def __init__(self, colour: np.ndarray):
        self.a, self.h, self.w = colour, colour.shape[0], colour.shape[1]
        self.half = np.float32(SCALES[colour.dtype] / 2)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """[r, W, 3] float32."""
        part = self.a[y0:y1].astype(np.float32) / self.half - np.float32(1)
        return part if part.ndim == 3 else np.repeat(part[..., None], 3, axis=2)

    def block(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """[1, 3, h, w] float32 of the region at (y, x), padded where it passes the image."""
        part = self.a[y:min(y + h, self.h), x:min(x + w, self.w)]
        chw = part.astype(np.float32) / self.half - np.float32(1)
        chw = np.repeat(chw[None], 3, axis=0) if chw.ndim == 2 else chw.transpose(2, 0, 1)
        return pad_bottom_right(chw, h - chw.shape[1], w - chw.shape[2])[None]


def _split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(image, np.ndarray) or image.dtype not in SCALES:
        raise ValueError(f"image must be a uint8 or uint16 numpy array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (2, 3, 4))
    if not ok or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be HxW, HxWx1 (grey), HxWx2 (grey+alpha), HxWx3 (RGB) or "
                         f"HxWx4 (RGBA) and non-empty, got shape {image.shape}")
    if image.ndim == 3 and image.shape[2] in (2, 4):
        return image[..., :-1].squeeze(-1) if image.shape[2] == 2 else image[..., :3], \
            image[..., -1]
    return image, None


class Restorer:
    """Restore images with the engines of one dir: `Restorer(dir).restore(array) -> array`.

    Arrays are uint8 or uint16, HxW (grey), HxWx3 (RGB) or with an alpha channel (passed
    through untouched); the output has the input's shape and dtype. Use as a context manager,
    or call `close()`, to free the engines.
    """

    def __init__(self, engine_dir: str | Path, options: RestoreOptions | None = None,
                 **overrides):
        opts = options or RestoreOptions(**overrides)
        validate_options(opts)
        self.options = opts
        self.manifest: Manifest = read_manifest(engine_dir, opts.verify_hashes)
        self.geometry: Geometry = plan_geometry(self.manifest, opts)
        if opts.timestep == "header":
            _check_header_mode(self.manifest)
        self.engines = open_engines(self.manifest, opts)
        self.backend = self.engines.kind

    def __enter__(self) -> "Restorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engines.close()

    def restore(self, image: np.ndarray, qf: int | None = None) -> np.ndarray:
        """The restored image (same shape and dtype). `qf`: the JPEG quality factor, used
        when the options say `timestep="header"`."""
        return self.restore_info(image, qf)[0]

    def restore_info(self, image: np.ndarray, qf: int | None = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> tuple[np.ndarray, dict]:
        """`restore`, plus a dict: tau and where it came from, the predicted QF, tile layout
        and milliseconds per stage. `progress(done, total)` is called after each tile."""
        colour, alpha = _split_alpha(image)
        src, ms = _Source(colour), dict.fromkeys(STAGES, 0.0)
        start = time.perf_counter()
        prompt = self._prompt(src, ms)
        tau, qf_pred, source = self._timestep(src, qf, ms)
        out = np.empty(image.shape, image.dtype)  # the only full-size array made here
        if alpha is not None:
            out[..., -1] = alpha
        dest = out.reshape(colour.shape) if alpha is None else (
            out[..., :3] if colour.ndim == 3 else out[..., 0])
        tiles = self._tiles(src, dest, prompt, tau, ms, progress)
        ms["total"] = (time.perf_counter() - start) * 1000
        info = {"tau": tau, "tau_source": source, "qf_predicted": qf_pred, "qf_header": qf,
                "size": [src.w, src.h], "tiles": tiles, "ms": {k: round(v, 2)
                                                                 for k, v in ms.items()}}
        return out, info

    # -- stages -----------------------------------------------------------------------------
    def _prompt(self, src: _Source, ms: dict) -> np.ndarray:
        s = self.manifest.saipe_size
        t = time.perf_counter()
        small = resize_rows(src.rows, src.h, src.w, (s, s))[None]
        prompt = self.engines["saipe"](image=small)["prompt"]
        ms["saipe"] += (time.perf_counter() - t) * 1000
        return prompt

    def _timestep(self, src: _Source, qf: int | None, ms: dict
                  ) -> tuple[float, float | None, str]:
        man = self.manifest
        if not man.predicted:
            return float(man.timestep_value), None, man.timestep_mode
        if self.options.timestep == "header":
            if qf is None:
                raise ValueError("timestep='header' needs the JPEG quality factor, and this image "
                                 "has no IJG quantization tables (not a JPEG, or custom tables); "
                                 "use the predictor (--timestep model)")
            qfs, taus = man.qf_table
            return float(np.interp(qf, qfs, taus)), None, "header"
        t = time.perf_counter()
        tau, qf_pred = self._predict(src)
        ms["predictor"] += (time.perf_counter() - t) * 1000
        return tau, qf_pred, "predictor"

    def _predict(self, src: _Source) -> tuple[float, float]:
        """The predictor on native pixels; an image larger than the engines' window is seen as
        grid-aligned crops of that window, whose taus (and QFs) are averaged."""
        g, taus, qfs = self.geometry, [], []
        wy, wx = min(src.h, g.tile[0]), min(src.w, g.tile[1])
        for y in crop_starts(src.h, wy, JPEG_BLOCK):
            for x in crop_starts(src.w, wx, JPEG_BLOCK):
                crop = src.block(y, x, wy, wx)
                ph, pw = g.predictor_side(wy, 0) - wy, g.predictor_side(wx, 1) - wx
                out = self.engines["predictor"](image=pad_bottom_right(crop, ph, pw))
                taus.append(float(out["timestep"].reshape(-1)[0]))
                qfs.append(float(out["qf"].reshape(-1)[0]))
        return float(np.mean(taus)), float(np.mean(qfs))

    def _one_tile(self, block: np.ndarray, prompt: np.ndarray, tau: float, ms: dict
                  ) -> np.ndarray:
        e, t0 = self.engines, time.perf_counter()
        latent = e["vae_encoder"](image=block)["latent"]
        t1 = time.perf_counter()
        feeds = {"latent": latent, "prompt": prompt}
        if self.manifest.predicted:
            feeds["timestep"] = np.array([tau], np.float32)
        clean = e["unet"](**feeds)["clean_latent"]
        t2 = time.perf_counter()
        out = e["vae_decoder"](clean_latent=clean)["image"][0]
        t3 = time.perf_counter()
        for name, a, b in (("vae_encoder", t0, t1), ("unet", t1, t2), ("vae_decoder", t2, t3)):
            ms[name] += (b - a) * 1000
        return np.clip(out, -1.0, 1.0, out=out)

    def _tiles(self, src: _Source, out: np.ndarray, prompt: np.ndarray, tau: float,
               ms: dict, progress: Callable[[int, int], None] | None) -> dict:
        """Restore tile by tile into `out` (a view shaped like the colour part)."""
        g, h, w = self.geometry, src.h, src.w
        th = g.fit(h, 0) if h <= g.tile[0] else g.tile[0]
        tw = g.fit(w, 1) if w <= g.tile[1] else g.tile[1]
        ys, xs = tile_starts(h, th, g.overlap, g.align), tile_starts(w, tw, g.overlap, g.align)
        wys, wxs = axis_weights(ys, th, h), axis_weights(xs, tw, w)
        band = np.zeros((3, th, w), np.float32)  # rows [top, top + th) still being blended
        top = 0
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                tile = self._one_tile(src.block(y, x, th, tw), prompt, tau, ms)
                vh, vw = wys[iy].size, wxs[ix].size
                band[:, :vh, x:x + vw] += tile[:, :vh, :vw] * (wys[iy][:, None] * wxs[ix][None])
                if progress is not None:
                    progress(iy * len(xs) + ix + 1, len(ys) * len(xs))
            done = ys[iy + 1] if iy + 1 < len(ys) else h
            out[top:done] = _to_uint(band[:, :done - top], out)
            band[:, :th - (done - top)] = band[:, done - top:]  # numpy buffers the overlap
            band[:, th - (done - top):] = 0
            top = done
        return {"count": len(ys) * len(xs), "tile": [th, tw], "grid": [len(ys), len(xs)]}


def _to_uint(chw: np.ndarray, like: np.ndarray) -> np.ndarray:
    """[3, r, W] in [-1, 1] -> [r, W, 3] (or [r, W] luma for grey) of `like`'s dtype, rounded
    like the PyTorch reference: round((x + 1) * max / 2), clipped."""
    if like.ndim == 2:
        chw = sum(np.float32(c) * chw[i] for i, c in enumerate(LUMA))[None]
    top = SCALES[like.dtype]
    v = chw + np.float32(1)  # the one temporary: the rest works in place
    v *= np.float32(top / 2)
    np.rint(v, out=v)
    v = np.clip(v, 0, top, out=v).astype(like.dtype)
    return v[0] if like.ndim == 2 else v.transpose(1, 2, 0)


def _check_header_mode(man: Manifest) -> None:
    if not man.predicted:
        raise ValueError(f"--timestep header: engine dir {man.root} bakes tau="
                         f"{man.timestep_value} into its UNet ({man.timestep_mode}); export with "
                         f"--timestep predicted to set tau per image")
    if man.qf_table is None:
        raise ValueError(f"--timestep header: engine dir {man.root} has no QF-to-tau table "
                         f"(timestep.qf_table); use --timestep model, or re-export with a "
                         f"trained predictor")
