"""`sodiff-serve`'s Ray Serve deployment: POST /restore (an image in, the restored image out,
tau, QF and timings in headers), GET /healthz. Concurrent requests meet in `@serve.batch`;
with tile batches, `Restorer.restore_batch` sends their same-shape tiles through each engine
call together.

Bad input is a 400 (not an image) or 413 (body or pixel count over the limits) whose body is
the runtime's one-line message; nothing reaches the client as a traceback. With an API key,
every route but /healthz wants `Authorization: Bearer KEY` (401 without it).
"""
from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
from dataclasses import dataclass, field

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from runtime.config import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY

from .config import (BATCH_WAIT_S, DEFAULT_MAX_BATCH, DEFAULT_MAX_BYTES, HEADER_PREFIX,
                     MEDIA_TYPES, RETRY_AFTER_S)

log = logging.getLogger("ray.serve")
FORMAT_ALIASES = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = DEFAULT_MAX_BATCH  # requests restored in one @serve.batch call at most
    batch_wait_s: float = BATCH_WAIT_S  # how long a batch waits to fill
    max_bytes: int = DEFAULT_MAX_BYTES  # request body limit (413 above it)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded pixel limit (413 above it); 0: none
    quality: int = DEFAULT_QUALITY  # JPEG/WebP response quality
    api_key: str | None = field(default=None, repr=False)  # bearer key (None: open service)
    door: str | None = None         # the drain door's actor name (scale/drain.py); None: none
    queued: int | None = None       # the door's limit over all replicas (--max-queued)
    timeout_s: float | None = None  # 504 for a request that waits or runs longer; None: never


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class RestoreService:
    """A replica: one Restorer, opened once; see the module docstring for the routes."""

    def __init__(self, engine: str, restore, opts: ServeOptions):
        from runtime import Restorer

        from .drain import find_door

        self.restorer = Restorer(engine, restore)
        self.opts = opts
        self.door = find_door(opts.door)
        self.restore_many.set_max_batch_size(opts.max_batch)
        self.restore_many.set_batch_wait_timeout_s(opts.batch_wait_s)

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except RequestError as e:
            return _text(e.status, str(e), e.headers)
        except Exception as e:  # noqa: BLE001 - the client gets one line, the log the rest
            log.exception("sodiff-serve: internal error")
            return _text(500, f"internal error ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})")

    async def _route(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if path != "/healthz" and not authorized(request, self.opts.api_key):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: "
                                    "Bearer KEY' with sodiff-serve's --api-key",
                               {"WWW-Authenticate": "Bearer"})
        routes = {"/healthz": ("GET", self._health), "/restore": ("POST", self._restore)}
        if path not in routes:
            raise RequestError(404, f"no route {path}; use POST /restore or GET /healthz")
        method, handler = routes[path]
        if request.method != method:
            raise RequestError(405, f"{path} takes {method}, not {request.method}")
        if self.door is None:
            return await handler(request)
        if path == "/healthz":  # a load balancer stops sending here while it drains
            if not await self.door.is_open.remote():
                raise RequestError(503, "sodiff-serve is draining", {"Retry-After":
                                                                      str(RETRY_AFTER_S)})
            return await handler(request)
        entered = await self.door.enter.remote()
        if entered != "in":
            raise RequestError(503, "sodiff-serve is shutting down; retry in a moment (another "
                                    "instance may take it)" if entered == "closed" else
                               f"sodiff-serve is full ({self.opts.queued} requests in flight, "
                               f"--max-queued); retry in a moment",
                               {"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await asyncio.wait_for(handler(request), self.opts.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the restore took longer than {self.opts.timeout_s:g} s "
                                    f"(sodiff-serve --timeout-s)") from None
        finally:
            self.door.leave.remote()

    async def _health(self, request: Request) -> Response:
        body = {"status": "ok", "engine": str(self.restorer.manifest.root),
                "backend": self.restorer.backend, "max_batch": self.opts.max_batch}
        return Response(json.dumps(body), media_type="application/json")

    async def _restore(self, request: Request) -> Response:
        from runtime.errors import ImageError
        from runtime.imageio import PixelLimitError, decode_image

        fmt = _format(request.query_params.get("format", "png"))
        body = await read_body(request, self.opts.max_bytes)
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
        return Response(data, media_type=MEDIA_TYPES[fmt], headers=_headers(info, batch))

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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (by its Content-Length
    when it declares one, else while it streams in)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of "
                                f"{limit:,} (sodiff-serve --max-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit:,} bytes "
                                    f"(sodiff-serve --max-bytes)")
        chunks.append(chunk)
    if not size:
        raise RequestError(400, "empty request body; POST the image file as the body")
    return b"".join(chunks)


def _format(value: str) -> str:
    fmt = FORMAT_ALIASES.get(value.lower())
    if fmt is None:
        raise RequestError(400, f"format={value!r}: use one of png, jpg, webp")
    return fmt


def _headers(info: dict, batch: int) -> dict[str, str]:
    p = HEADER_PREFIX
    headers = {p + "Batch": str(batch),
               "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in info["ms"].items())}
    if info.get("tau") is not None:
        headers[p + "Tau"] = f"{info['tau']:.3f}"
        headers[p + "Tau-Source"] = str(info["tau_source"])
    if info.get("qf_predicted") is not None:
        headers[p + "QF"] = f"{info['qf_predicted']:.2f}"
    if info.get("qf_header") is not None:
        headers[p + "QF-Header"] = str(info["qf_header"])
    if info.get("gate") is not None:  # the weight kept of the restoration, and the QF read
        g = info["gate"]
        headers[p + "Gate"] = f"{g['weight']:.4g}; qf={g['qf']:g}; source={g['qf_source']}"
    if info.get("constraint_k") is not None:
        headers[p + "Constraint"] = str(info["constraint_k"])
    return headers


def authorized(request: Request, key: str | None) -> bool:
    """Whether `request` carries `Authorization: Bearer <key>` (always, without a key);
    compared in constant time, so the time taken says nothing about the key."""
    if not key:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return hmac.compare_digest(token.strip().encode(), key.encode()) and \
        scheme.lower() == "bearer"


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(message + "\n", status_code=status, media_type="text/plain",
                    headers=headers)


def build_app(engine: str, restore, opts: ServeOptions, replicas: int, cpus: float,
              gpus: float):
    """The bound Serve application: `replicas` copies of RestoreService."""
    deployment = serve.deployment(RestoreService, name="RestoreService").options(
        # Every request up to the door's limit reaches a replica at once, so that the door, not
        # Serve's own queue, answers an overload (with our 503).
        num_replicas=replicas, max_ongoing_requests=max(2 * opts.max_batch, 8,
                                                        -(-(opts.queued or 0) // replicas) + 1),
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
    return deployment.bind(engine, restore, opts)
