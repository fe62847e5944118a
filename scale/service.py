"""`sodiff-serve`'s Ray Serve application: POST /restore (an image in, the restored image out,
tau, QF and timings in headers), GET /healthz, GET /metrics and the before/after page at
GET / (page.py, static/), each below the route prefix (--route-prefix). This ingress owns the
HTTP side (routes, the API key, the drain door and its bounds, the timeout) and sends each
body to the restore replicas (scale/replica.py); a request whose replica dies is sent once
more, to another, and gets our 503 when none is left, never Ray's 500.

Bad input is a 400 (not an image) or 413 (body or pixel count over the limits) whose body is
the runtime's one-line message; nothing reaches the client as a traceback. With an API key,
every route but /healthz and the page's files wants `Authorization: Bearer KEY` (401 without
it).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from .config import REPLICA_RETRIES, RETRY_AFTER_S
from .job import first_line
from .page import FILES, load_page
from .protocol import FORMAT_ALIASES, RequestError, ServeOptions

# What a handle call raises when its replica died or cannot be reached.
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

log = logging.getLogger("ray.serve")
ROUTES = {"/healthz": ("GET", "_health"), "/restore": ("POST", "_restore"),
          "/metrics": ("GET", "_metrics"), **{route: ("GET", "_page") for route in FILES}}
OPEN = {"/healthz", *FILES}  # routes without the key: liveness, and the page (no data in it)
PAGE_METRIC = "/"  # the page's files count under one route label


class RestoreService:
    """The ingress: HTTP routes, the key, the door (drain, bounds, timeout) and one retry when
    a restore replica dies; the restoring is `replica`'s (scale/replica.py)."""

    def __init__(self, replica, opts: ServeOptions):
        from .drain import find_door

        from .metrics import ServeMetrics

        self.replica, self.opts = replica, opts
        self.door = find_door(opts.door)
        self.metrics = ServeMetrics()
        self.page = load_page()

    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await self._route(request)
        except RequestError as e:
            response = _text(e.status, str(e), e.headers)
        except Exception as e:  # noqa: BLE001 - the client gets one line, the log the rest
            log.exception("sodiff-serve: internal error")
            response = _text(500, f"internal error ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no detail'})")
        path = route_path(request)
        label = PAGE_METRIC if path in FILES else path if path in ROUTES else "other"
        self.metrics.observe(label, response.status_code, time.perf_counter() - start,
                             response.headers)
        return response

    async def _route(self, request: Request) -> Response:
        path = route_path(request)
        if not request.url.path.endswith("/") and path == "/" and request.scope.get(
                "root_path"):  # /prefix: the page's relative URLs need /prefix/
            return Response(status_code=308, headers={
                "Location": request.url.path.rsplit("/", 1)[-1] + "/"})
        if path not in OPEN and not authorized(request, self.opts.api_key):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: "
                                    "Bearer KEY' with sodiff-serve's --api-key",
                               {"WWW-Authenticate": "Bearer"})
        if path not in ROUTES:
            raise RequestError(404, f"no route {path}; use GET / (the page), POST /restore, "
                                    f"GET /healthz or GET /metrics")
        method, name = ROUTES[path]
        handler = getattr(self, name)
        if request.method != method:
            raise RequestError(405, f"{path} takes {method}, not {request.method}")
        if self.door is None or path == "/metrics" or path in FILES:  # no replica's work
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

    async def _metrics(self, request: Request) -> Response:
        inflight = None if self.door is None else (await self.door.state.remote())[0]
        data, media = self.metrics.text(inflight)
        return Response(data, headers={"Content-Type": media})

    async def _page(self, request: Request) -> Response:
        data, headers = self.page[route_path(request)]
        return Response(data, headers=headers)

    async def _health(self, request: Request) -> Response:
        try:
            body = await self.replica.health.remote()
        except REPLICA_GONE:
            raise RequestError(503, "no restore replica is up yet; retry in a moment",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
        return Response(json.dumps(body), media_type="application/json")

    async def _restore(self, request: Request) -> Response:
        fmt = _format(request.query_params.get("format", "png"))
        body = await read_body(request, self.opts.max_bytes)
        for attempt in range(1 + REPLICA_RETRIES):  # a restore is idempotent: safe to repeat
            try:
                status, headers, media, data = await self.replica.restore.remote(body, fmt)
                return Response(data, status_code=status, media_type=media, headers=headers)
            except REPLICA_GONE as e:
                log.warning("sodiff-serve: a restore replica died under a request (attempt "
                            "%d): %s", attempt + 1, first_line(e))
        raise RequestError(503, "the restore replica died and no other could take the "
                                "request; retry in a moment", {"Retry-After": str(RETRY_AFTER_S)})


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


def route_path(request: Request) -> str:
    """The request's path below the route prefix (Serve keeps the prefix in the path and
    puts it in root_path too), without a trailing slash; "/" for the prefix itself."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def _format(value: str) -> str:
    fmt = FORMAT_ALIASES.get(value.lower())
    if fmt is None:
        raise RequestError(400, f"format={value!r}: use one of png, jpg, webp")
    return fmt


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
    """The bound Serve application: one RestoreService ingress (no CPU reserved) in front of
    `replicas` RestoreReplicas."""
    from .replica import RestoreReplica

    ingress = serve.deployment(RestoreService, name="RestoreService").options(
        num_replicas=1, max_ongoing_requests=(opts.queued or 64) + 16,
        ray_actor_options={"num_cpus": 0})
    deployment = serve.deployment(RestoreReplica, name="RestoreReplica").options(
        # Every request up to the door's limit reaches a replica at once, so that the door, not
        # Serve's own queue, answers an overload (with our 503).
        num_replicas=replicas, max_ongoing_requests=max(2 * opts.max_batch, 8,
                                                        -(-(opts.queued or 0) // replicas) + 1),
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
    return ingress.bind(deployment.bind(engine, restore, opts), opts)
