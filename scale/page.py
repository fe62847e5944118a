"""sodiff-serve's before/after page (GET /): static files shipped in the wheel (scale/static/),
read once and served from memory with a strict Content-Security-Policy. The page holds no
data, so it needs no API key (a browser cannot send a bearer token when it navigates); its
requests to /restore do."""
from __future__ import annotations

from importlib import resources

# route (relative to the route prefix): (file in scale/static/, media type)
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/page.css": ("page.css", "text/css; charset=utf-8"),
         "/page.js": ("page.js", "text/javascript; charset=utf-8"),
         "/favicon.svg": ("favicon.svg", "image/svg+xml")}

# Only the page's own files may run, style or fetch. img-src adds blob: because the before and
# after views are blob: URLs of the chosen file and of the response, which never leave the
# tab. default-src does not cover base-uri, form-action and frame-ancestors, so they are shut
# separately: no <base> can re-point the relative URLs, the key form cannot post anywhere,
# and no other site can frame the page.
CSP = ("default-src 'self'; img-src 'self' blob:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


def load_page() -> dict[str, tuple[bytes, dict[str, str]]]:
    """{route: (bytes, response headers)} of every file of the page."""
    root = resources.files(__package__) / "static"
    return {route: ((root / name).read_bytes(), page_headers(media))
            for route, (name, media) in FILES.items()}


def page_headers(media: str) -> dict[str, str]:
    """A page file's headers: its type (never sniffed), the CSP, no caching across upgrades."""
    return {"Content-Type": media, "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer"}
