"""What the ingress (service.py) and the restore replicas (replica.py) share: the service's
options, the refusal type, the response formats and the headers a restore answers with."""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.config import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY

from .config import BATCH_WAIT_S, DEFAULT_MAX_BATCH, DEFAULT_MAX_BYTES, HEADER_PREFIX

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
