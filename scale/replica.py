"""`sodiff-serve`'s restore replicas: one Restorer each, opened once. A request body comes
from the ingress (scale/service.py) and goes back as the restored image's bytes and headers.
Concurrent requests meet in `@serve.batch`; with tile batches, `Restorer.restore_batch_info`
sends their same-shape tiles through each engine call together."""
from __future__ import annotations

import asyncio
import io

from ray import serve

from .config import BATCH_WAIT_S, DEFAULT_MAX_BATCH, MEDIA_TYPES
from .protocol import PIL_FORMATS, RequestError, ServeOptions, _headers


class RestoreReplica:
    """One Restorer; `restore(body, fmt)` per request, batched across requests."""

    def __init__(self, engine: str, restore, opts: ServeOptions):
        from runtime import Restorer

        self.restorer = Restorer(engine, restore)
        self.opts = opts
        self.restore_many.set_max_batch_size(opts.max_batch)
        self.restore_many.set_batch_wait_timeout_s(opts.batch_wait_s)

    async def health(self) -> dict:
        return {"status": "ok", "engine": str(self.restorer.manifest.root),
                "backend": self.restorer.backend, "max_batch": self.opts.max_batch}

    async def restore(self, body: bytes, fmt: str) -> tuple[int, dict, str, bytes]:
        """A request body in, (status, headers, media type, bytes) out: the restored image,
        or a 4xx/5xx with one line."""
        try:
            return await self._restore(body, fmt)
        except RequestError as e:
            return e.status, e.headers or {}, "text/plain", (str(e) + "\n").encode()

    async def _restore(self, body: bytes, fmt: str) -> tuple[int, dict, str, bytes]:
        from runtime.errors import ImageError
        from runtime.imageio import PixelLimitError, decode_image

        try:
            img = await asyncio.to_thread(decode_image, body, "request body",
                                          self.opts.max_pixels)
        except ImageError as e:
            raise RequestError(413 if isinstance(e, PixelLimitError) else 400, str(e)) from None
        result = await self.restore_many((img.array, img.qf, img.jpeg))
        if isinstance(result, Exception):  # ValueError: this image; others: the engines
            status = 400 if isinstance(result, ValueError) else 500
            raise RequestError(status, f"request body: {str(result).splitlines()[0]}")
        out, info, batch = result
        data = await asyncio.to_thread(self._encode, out, fmt, img.icc, img.exif)
        return 200, _headers(info, batch), MEDIA_TYPES[fmt], data

    def _encode(self, array, fmt: str, icc, exif) -> bytes:
        from runtime.errors import ImageError
        from runtime.imageio import encode_image

        buf = io.BytesIO()
        try:
            encode_image(buf, array, PIL_FORMATS[fmt], icc, exif, self.opts.quality)
        except ImageError as e:  # e.g. alpha to JPEG
            raise RequestError(400, f"request body: {e}; ask for ?format=png") from None
        return buf.getvalue()

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def restore_many(self, items: list[tuple]) -> list:
        """(array, header QF, JPEG tables) per request -> (restored, info, requests in this
        call), or the exception that image alone raised."""
        return await asyncio.to_thread(self._restore_group, items)

    def _restore_group(self, items: list[tuple]) -> list:
        """Restore a @serve.batch's images: with a tile batch above 1, `restore_batch_info`
        puts tiles of several same-shape images through each engine call (each response
        carries its own tau, QF and gate, and the call's stage timings); else each image in
        turn."""
        results: list = [None] * len(items)
        if self.restorer.tile_batch > 1 and len(items) > 1:
            try:
                done = self.restorer.restore_batch_info(*map(list, zip(*items)))
            except (ValueError, RuntimeError):
                done = None  # one bad image fails the call: find it below, image by image
            if done is not None:
                return [(out, info, len(items)) for out, info in done]
        for i, (array, qf, jpeg) in enumerate(items):
            try:
                out, info = self.restorer.restore_info(array, qf, jpeg=jpeg)
                results[i] = (out, info, len(items))
            except (ValueError, RuntimeError) as e:
                results[i] = e
        return results
