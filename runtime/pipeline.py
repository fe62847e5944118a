"""`Restorer`: the SODiff pipeline over an engine dir, in numpy.

decode -> [-1, 1] -> SAIPE prompt (image resized to saipe_size) -> tau (predictor on native
pixels, the manifest's fixed value, or the JPEG header's QF) -> per tile: pad bottom/right,
VAE encoder, UNet, VAE decoder, the input tile's mean colour (`keep_colour`), crop ->
feathered blend -> uint -> the high-QF gate's blend toward the JPEG (runtime/gate.py) -> the
JPEG quantization constraint where the input's tables are known (runtime/jpegqcs.py). A JPEG
with an EXIF orientation is restored on its stored grid and turned upright at the end
(runtime/orient.py), so that the predictor, the tiles and the constraint see its 8x8 blocks
where they are. The prompt and tau are computed once per image; tiles go to the
engines in batches (`tile_batch`, runtime/tiles.py) and blend through a band of rows, so memory
beyond the input and output arrays does not grow with the image. Between the encoder, UNet
and decoder the latents stay on the device (IO binding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import Component, Tensor, open_engines
from .config import (DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, JPEG_BLOCK, RestoreOptions,
                     validate_options)
from .geometry import Geometry, plan_geometry
from .gate import settle
from .jpegcoef import with_coefficients
from .jpegqcs import JpegTables, check_tables, tables_of
from .jpegqf import equivalent_quality
from .manifest import Manifest, read_manifest
from .orient import stored, upright
from .resize import resize_rows
from .tiles import (Band, Layout, Neutral, Source, TileJob, batch_limits, in_batches,
                    is_neutral, keep_mean_colour, pad_batch, pad_bottom_right, plan_layout,
                    plan_tile_batch, split_alpha, tile_jobs)
from .tiling import crop_starts

STAGES = ("saipe", "predictor", "vae_encoder", "unet", "vae_decoder")
__all__ = ["Restorer", "pad_bottom_right"]


@dataclass
class _Image:
    """One image of a restore call, from its input to its restored output."""

    src: Source                   # float views of the colour part
    out: np.ndarray               # the output (alpha already copied)
    dest: np.ndarray              # its colour part, written a band of rows at a time
    prompt: np.ndarray            # [1, 77, D] float32, SAIPE's, computed once
    tau: float                    # the timestep, computed once
    layout: Layout                # its tiles
    info: dict                    # tau's source, the QFs and the gate, for restore_info
    lq: np.ndarray                # the input on the grid restored (a JPEG's stored one)
    weight: float = 1.0           # the gate's weight of the restoration (1: not gated)
    orientation: int = 1          # EXIF orientation to turn the output upright by
    jpeg: JpegTables | None = None  # the input's JPEG tables, for the quantization constraint
    band: Band | None = None      # the blending band while its tiles are in flight
    done: int = 0                 # tiles blended so far

    def block(self, job: TileJob) -> np.ndarray:
        lay = self.layout
        return self.src.block(lay.ys[job.iy], lay.xs[job.ix], lay.th, lay.tw)

    def keep_colour(self, job: TileJob, tile: np.ndarray, block: np.ndarray) -> None:
        lay = self.layout
        y, x = lay.ys[job.iy], lay.xs[job.ix]
        keep_mean_colour(tile, block, min(lay.th, self.src.h - y), min(lay.tw, self.src.w - x))

    def blend(self, job: TileJob, tile: np.ndarray) -> None:
        if self.band is None:
            self.band = Band(self.layout, self.dest, self.src.h, self.src.w)
        self.band.add(job.iy, job.ix, tile)
        self.done += 1
        if self.done == self.layout.count:
            self.band = None  # written out; free it before the next image's tiles


class _Conditioning:
    """The UNet's prompt (and timestep) rows for a batch of tiles, uploaded only when the
    batch's images change: for one image's tiles, once per image and batch size, and they
    stay on the device across the batches."""

    def __init__(self, unet: Component, predicted: bool):
        self.unet, self.predicted = unet, predicted
        self.key: tuple | None = None
        self.feeds: dict[str, Tensor] = {}

    def __call__(self, owners: list[_Image], n: int) -> dict[str, Tensor]:
        owners = owners + owners[-1:] * (n - len(owners))  # rows of a padded batch
        key = tuple(id(o) for o in owners)
        if key != self.key:
            self.feeds = {"prompt": self.unet.put(
                "prompt", np.concatenate([o.prompt for o in owners]))}
            if self.predicted:
                self.feeds["timestep"] = self.unet.put(
                    "timestep", np.array([o.tau for o in owners], np.float32))
            self.key = key
        return self.feeds


class Restorer:
    """Restore images with the engines of one dir: `Restorer(dir).restore(array) -> array`.

    Arrays are uint8 or uint16, HxW (grey), HxWx3 (RGB) or with an alpha channel (passed
    through untouched); the output has the input's shape and dtype. Use as a context manager,
    or call `close()`, to free the engines. One call at a time: bound device buffers are
    reused from call to call, so threads need a Restorer each.
    """

    def __init__(self, engine_dir: str | Path, options: RestoreOptions | None = None,
                 **overrides):
        opts = options or RestoreOptions(**overrides)
        validate_options(opts)
        self.options = opts
        self.manifest: Manifest = read_manifest(engine_dir, opts.verify_hashes)
        self.geometry: Geometry = plan_geometry(self.manifest, opts)
        self.tile_batch = plan_tile_batch(opts, self.manifest)  # before loading anything
        self._least = batch_limits(self.manifest)[0]
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

    def restore(self, image, qf: int | None = None, jpeg: JpegTables | None = None):
        """The restored image: a numpy array of the input's shape and dtype, or a PIL image
        for a PIL image (its mode kept where the runtime writes it; palette images come back
        RGB/RGBA). `qf`: the JPEG quality factor, for `timestep="header"` only. `jpeg`: the
        input's quantization tables (`JpegTables.ijg(qf)`, or `tables_of` an opened JPEG
        file), to make the output consistent with them (runtime/jpegqcs.py); a PIL JPEG's
        are read from it, with its coefficients when it was opened from a file."""
        if qf is not None and self.options.timestep != "header":
            raise ValueError(f"qf={qf} is only used with timestep='header' (this Restorer "
                             f"predicts tau: timestep={self.options.timestep!r}); drop qf, or "
                             f"open the Restorer with timestep='header'")
        if _is_pil(image):
            from .imageio import from_pil, to_pil
            if jpeg is None:
                jpeg = tables_of(image)
                name = getattr(image, "filename", "")  # opened from a file: its coefficients
                if name and Path(name).is_file():
                    jpeg = with_coefficients(jpeg, name, (image.height, image.width))
            return to_pil(self.restore_info(from_pil(image), qf, jpeg=jpeg)[0], image)
        return self.restore_info(image, qf, jpeg=jpeg)[0]

    def restore_file(self, src: str | Path, dst: str | Path, *, overwrite: bool = False,
                     quality: int = DEFAULT_QUALITY, max_pixels: int = DEFAULT_MAX_PIXELS
                     ) -> dict:
        """Restore the image file `src` into `dst` (format from its extension) as `sodiff-run`
        does: EXIF orientation applied, ICC profile and EXIF kept, the JPEG header's QF read,
        written atomically, never replacing `dst` without `overwrite`. Returns the report line
        (docs/runtime.md); raises runtime.ImageError for unreadable or unwritable files."""
        from .batch import BatchOptions, Job, process
        job = Job(Path(src), Path(dst))
        return process(self, job, BatchOptions(out=job.target, overwrite=overwrite,
                                               quality=quality, max_pixels=max_pixels))

    def restore_info(self, image: np.ndarray, qf: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     jpeg: JpegTables | None = None) -> tuple[np.ndarray, dict]:
        """`restore`, plus a dict: tau and where it came from, the predicted QF, tile layout,
        whether the JPEG constraint ran, and milliseconds per stage. `progress(done, total)` is
        called after each tile."""
        ms, start = dict.fromkeys(STAGES, 0.0), time.perf_counter()
        im = self._prepare(image, qf, ms, jpeg)
        batches = self._restore_tiles([im], ms, progress)
        out = self._finish(im)
        ms["total"] = (time.perf_counter() - start) * 1000
        return out, self._report(im, out, batches, ms)

    def restore_batch(self, images: list[np.ndarray], qfs: list[int | None] | None = None,
                      jpegs: list[JpegTables | None] | None = None) -> list[np.ndarray]:
        """Restore several images (each like `restore`'s); tiles of the same shape go to the
        engines together, across images, up to `tile_batch` a call. Each image keeps its own
        prompt and tau. `qfs`: per image, for `timestep="header"`; `jpegs`: per image, its
        JPEG tables (or None)."""
        return [out for out, _ in self.restore_batch_info(images, qfs, jpegs)]

    def restore_batch_info(self, images: list[np.ndarray], qfs: list[int | None] | None = None,
                           jpegs: list[JpegTables | None] | None = None
                           ) -> list[tuple[np.ndarray, dict]]:
        """`restore_batch`, with each image's `restore_info` dict; its `ms` are those of the
        whole call (the engines ran the images' tiles together), `tiles.images` how many
        images shared it."""
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"restore_batch takes a list of arrays, got "
                             f"{type(images).__name__}")
        qfs = [None] * len(images) if qfs is None else list(qfs)
        jpegs = [None] * len(images) if jpegs is None else list(jpegs)
        for name, given in (("qfs", qfs), ("jpegs", jpegs)):
            if len(given) != len(images):
                raise ValueError(f"restore_batch: {len(given)} {name} for {len(images)} images")
        ms, start = dict.fromkeys(STAGES, 0.0), time.perf_counter()
        todo = [self._prepare(image, qf, ms, jpeg)
                for image, qf, jpeg in zip(images, qfs, jpegs)]
        groups: dict[tuple[int, int], list[_Image]] = {}
        for im in todo:  # the engines batch tensors of one shape
            groups.setdefault((im.layout.th, im.layout.tw), []).append(im)
        batches = {key: self._restore_tiles(group, ms, None) for key, group in groups.items()}
        outs = [self._finish(im) for im in todo]
        ms["total"] = (time.perf_counter() - start) * 1000
        keys = [(im.layout.th, im.layout.tw) for im in todo]
        return [(out, self._report(im, out, batches[key], ms, images=len(groups[key])))
                for im, out, key in zip(todo, outs, keys)]

    def _report(self, im: _Image, out: np.ndarray, batches: int, ms: dict,
                **tiles) -> dict:
        """restore_info's dict for one restored image (`tiles`: more tile facts)."""
        return {**im.info, "size": [out.shape[1], out.shape[0]],
                "tiles": {**im.layout.info(), "batch": self.tile_batch, "batches": batches,
                          **tiles},
                "ms": {k: round(v, 2) for k, v in ms.items()}}

    # -- stages -----------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray, qf: int | None, ms: dict,
                 jpeg: JpegTables | None = None) -> _Image:
        """Check the array, compute its prompt and tau, and make its output. An RGB image
        whose every pixel is grey goes the grey path (restored colour would be a tint)."""
        if jpeg is not None:
            if not isinstance(jpeg, JpegTables):
                raise ValueError(f"jpeg={type(jpeg).__name__}: expected runtime.JpegTables "
                                 f"(JpegTables.ijg(qf), or tables_of an opened JPEG) or None")
            if isinstance(image, np.ndarray) and jpeg.orientation != 1:
                image = np.ascontiguousarray(stored(image, jpeg.orientation))
            check_tables(jpeg, image)
        colour, alpha = split_alpha(image)
        neutral = is_neutral(colour)
        src = Source(colour[..., 0] if neutral else colour)
        prompt = self._prompt(src, ms)
        tau, qf_pred, source = self._timestep(src, qf, ms)
        out = np.empty(image.shape, image.dtype)  # the only full-size array made here
        if alpha is not None:
            out[..., -1] = alpha
        dest = out.reshape(colour.shape) if alpha is None else (
            out[..., :3] if colour.ndim == 3 else out[..., 0])
        if neutral:
            dest = Neutral(dest)
        on = jpeg is not None and self.options.jpeg_constraint
        gate = self._gate(jpeg, qf, qf_pred)
        info = {"tau": tau, "tau_source": source, "qf_predicted": qf_pred, "qf_header": qf,
                "neutral": neutral, "jpeg_constraint": on,
                "constraint_k": jpeg.source if on else None, "gate": gate}
        return _Image(src, out, dest, prompt, tau, plan_layout(self.geometry, src.h, src.w),
                      info, image, 1.0 if gate is None else gate["weight"],
                      1 if jpeg is None else jpeg.orientation, jpeg if on else None)

    def _gate(self, jpeg: JpegTables | None, qf: int | None, qf_pred: float | None
              ) -> dict | None:
        """The gate's weight for one image and the quality it was read at: the file's tables
        (their nearest IJG quality), else the header QF given, else the predictor's."""
        gate = self.manifest.gate
        if gate is None or not self.options.gate:
            return None
        if jpeg is not None:
            at, source = float(equivalent_quality(jpeg.tables[0])), "tables"
        elif qf is not None:
            at, source = float(qf), "header"
        elif qf_pred is not None:
            at, source = float(qf_pred), "predictor"
        else:
            return None  # a fixed-tau dir without tables: no quality to read the curve at
        return {"weight": round(gate.weight_at(at), 4), "qf": round(at, 2), "qf_source": source}

    @staticmethod
    def _finish(im: _Image) -> np.ndarray:
        """The gate's blend toward the input, the quantization constraint, and the output
        turned upright where the input was a rotated JPEG."""
        settle(im.out, im.lq, im.jpeg, im.weight)
        o = im.orientation
        return im.out if o == 1 else np.ascontiguousarray(upright(im.out, o))

    def _single(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """One image through SAIPE or the predictor (padded to the engines' smallest batch)."""
        out = self.engines[name](image=pad_batch([x], self._least))
        return {k: v[:1] for k, v in out.items()}

    def _prompt(self, src: Source, ms: dict) -> np.ndarray:
        s = self.manifest.saipe_size
        t = time.perf_counter()
        small = resize_rows(src.rows, src.h, src.w, (s, s))[None]
        prompt = self._single("saipe", small)["prompt"]
        ms["saipe"] += (time.perf_counter() - t) * 1000
        return prompt

    def _timestep(self, src: Source, qf: int | None, ms: dict
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

    def _predict(self, src: Source) -> tuple[float, float]:
        """The predictor on native pixels; an image larger than the engines' window is seen as
        grid-aligned crops of that window, whose taus (and QFs) are averaged."""
        g, taus, qfs = self.geometry, [], []
        wy, wx = min(src.h, g.tile[0]), min(src.w, g.tile[1])
        for y in crop_starts(src.h, wy, JPEG_BLOCK):
            for x in crop_starts(src.w, wx, JPEG_BLOCK):
                crop = src.block(y, x, wy, wx)
                ph, pw = g.predictor_side(wy, 0) - wy, g.predictor_side(wx, 1) - wx
                out = self._single("predictor", pad_bottom_right(crop, ph, pw))
                taus.append(float(out["timestep"].reshape(-1)[0]))
                qfs.append(float(out["qf"].reshape(-1)[0]))
        return float(np.mean(taus)), float(np.mean(qfs))

    def _restore_tiles(self, images: list[_Image], ms: dict,
                       progress: Callable[[int, int], None] | None) -> int:
        """Every tile of `images` (one tile shape) in raster order, `tile_batch` at a time,
        blended into each image's output; returns the number of batches."""
        jobs = chain.from_iterable(tile_jobs(i, im.layout) for i, im in enumerate(images))
        conditioning, batches = _Conditioning(self.engines["unet"], self.manifest.predicted), 0
        for batch in in_batches(jobs, self.tile_batch):
            owners = [images[j.image] for j in batch]
            blocks = [o.block(j) for o, j in zip(owners, batch)]
            tiles = self._batch(blocks, owners, conditioning, ms)
            for job, owner, block, tile in zip(batch, owners, blocks, tiles):
                if self.options.keep_colour:
                    owner.keep_colour(job, tile, block)
                owner.blend(job, tile)
                if progress is not None:
                    progress(owner.done, owner.layout.count)
            batches += 1
        return batches

    def _batch(self, blocks: list[np.ndarray], owners: list[_Image],
               conditioning: _Conditioning, ms: dict) -> np.ndarray:
        """Encoder, UNet and decoder on a batch of tiles; the latents stay on the device and
        only the restored tiles come back: [N, 3, th, tw] float32 in [-1, 1]."""
        e, t0 = self.engines, time.perf_counter()
        x = pad_batch(blocks, self._least)
        enc, unet, dec = e["vae_encoder"], e["unet"], e["vae_decoder"]
        latent = enc.run(image=enc.put("image", x))["latent"]
        t1 = time.perf_counter()
        clean = unet.run(latent=latent, **conditioning(owners, len(x)))["clean_latent"]
        t2 = time.perf_counter()
        out = dec.fetch(dec.run(clean_latent=clean)["image"])[:len(blocks)]
        t3 = time.perf_counter()
        for name, a, b in (("vae_encoder", t0, t1), ("unet", t1, t2), ("vae_decoder", t2, t3)):
            ms[name] += (b - a) * 1000
        return np.clip(out, -1.0, 1.0, out=out)


def _is_pil(image) -> bool:
    """A PIL image, without importing Pillow for callers that never pass one."""
    return type(image).__module__.startswith("PIL.")


def _check_header_mode(man: Manifest) -> None:
    if not man.predicted:
        raise ValueError(f"--timestep header: engine dir {man.root} bakes tau="
                         f"{man.timestep_value} into its UNet ({man.timestep_mode}); export with "
                         f"--timestep predicted to set tau per image")
    if man.qf_table is None:
        raise ValueError(f"--timestep header: engine dir {man.root} has no QF-to-tau table "
                         f"(timestep.qf_table); use --timestep model, or re-export with a "
                         f"trained predictor")
