"""sodiff-serve's before/after page (scale/page.py, scale/static/) in a real browser: headless
Chromium (the system's, driven by Playwright) against the real `sodiff-serve` command on its
own local Ray cluster, serving the bundled model under a route prefix and an API key. Every
page runs with the network cut off from everything but the service, and ends with no console
error (CSP violations included), no page error and no request elsewhere.

The browser tests skip, saying what to install, where no Chromium or no Playwright is found;
the HTTP checks of the page's files run everywhere. SODIFF_WRITE_SCREENSHOT=1 writes the
screenshot docs/images/serve_page.png (else it goes to a temp folder)."""
from __future__ import annotations

import http.client
import io
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from fixtures.serve_proc import post, start_server, stop_server

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ENV = "SODIFF_CHROMIUM"   # a Chromium binary to use instead of the one on PATH
NO_BROWSER = ("no browser for the page tests: apt install chromium and pip install playwright "
              f"(or set {CHROMIUM_ENV} to a Chromium binary)")
# Root needs --no-sandbox; the rest keeps Chromium from calling out (updates, sync, QUIC),
# which the cut-off network would refuse.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOT = REPO / "docs" / "images" / "serve_page.png"
PREFIX = "/sodiff"          # the module's server is under this route prefix...
API_KEY = "page-k3y"        # ...and wants this key
MAX_BYTES = 150_000
PHOTO_SIDE = 256            # the photo sent: scikit-image's astronaut at JPEG quality 10
TIMEOUT_MS = 60_000         # a restore on 2 busy cores


def chromium() -> str | None:
    """$SODIFF_CHROMIUM, else chromium (or chromium-browser) on PATH."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(NO_BROWSER)
    path = chromium()
    if path is None:
        pytest.skip(NO_BROWSER if not os.environ.get(CHROMIUM_ENV) else
                    f"{CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]} is not a file; {NO_BROWSER}")
    with sync_playwright() as p:
        found = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield found
        found.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The bundled model (weights/tiny) as ONNX, as the demo exports it."""
    from demo.core import DYNAMIC
    from export.options import ExportOptions
    from export.pipeline import run_export

    out = tmp_path_factory.mktemp("page-engine") / "tiny"
    run_export(ExportOptions(out=out, dynamic=DYNAMIC, samples=1), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """The base URL (ending with PREFIX) of a running sodiff-serve."""
    url, proc, _ = start_server(engine, tmp_path_factory.mktemp("page-serve"), "--max-bytes",
                                str(MAX_BYTES), "--threads", "1",
                                env={"SODIFF_API_KEY": API_KEY}, prefix=PREFIX)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    skimage = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("page-photo") / "astronaut.jpg"
    Image.fromarray(skimage.astronaut()).resize((PHOTO_SIDE, PHOTO_SIDE), Image.LANCZOS).save(
        path, quality=10)
    return path


@pytest.fixture(scope="module")
def direct(server, photo):
    """(headers, PNG bytes) of the photo POSTed straight to the service."""
    status, headers, data = post(server, photo.read_bytes(), "?format=png", key=API_KEY)
    assert status == 200, data
    return headers, data


class Watched:
    """A page whose console errors, page errors and requests off the service are recorded.

    Chromium itself logs each 4xx answer to a fetch as a console error ("Failed to load
    resource: ... status of 401"); `check(401)` lets those of the statuses a test provokes
    through, and nothing else."""

    def __init__(self, context, origin: str):
        self.errors, self.outside = [], []
        self.origin = origin
        context.route("**/*", self._gate)
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def _console(self, message):
        if message.type == "error":
            self.errors.append(message.text)

    def _gate(self, route):
        url = route.request.url
        if urlsplit(url).netloc == self.origin:
            route.continue_()
        else:  # the cut-off network: only the service answers
            self.outside.append(url)
            route.abort()

    def check(self, *statuses: int):
        refused = tuple(f"Failed to load resource: the server responded with a status of {s} "
                        for s in statuses)
        assert [e for e in self.errors if not e.startswith(refused)] == [], \
            self.errors
        assert self.outside == [], self.outside


@pytest.fixture
def watched(browser, server):
    context = browser.new_context(viewport={"width": 960, "height": 800}, accept_downloads=True)
    yield Watched(context, urlsplit(server).netloc)
    context.close()


def open_page(w: Watched, url: str):
    w.page.goto(url)
    w.page.wait_for_selector("body[data-ready='1']", state="attached")
    return w.page


def status(page) -> tuple[str, str | None]:
    """(the status line's text, its HTTP code or None)."""
    s = page.locator("#status")
    return s.text_content(), s.get_attribute("data-code")


def answer(page, action):
    """The response to the POST /restore that `action()` makes the page send, once the page
    has shown it."""
    with page.expect_response(lambda r: "/restore" in r.url) as got:
        action()
    page.wait_for_selector("body:not(.busy)", state="attached")
    return got.value


def give_key(page, key: str):
    page.fill("#key", key)
    page.click("#key-form button")


def restore_with_key(page, path: Path):
    """Open `path` in a fresh page: a 401 brings the key form, the key resends it. Returns
    the 200 response to the resent request."""
    assert answer(page, lambda: page.set_input_files("#file", path)).status == 401
    assert page.locator("#key-form").is_visible()
    got = answer(page, lambda: give_key(page, API_KEY))
    assert got.status == 200 and status(page)[0].endswith(": restored")
    return got


def shot(page, selector: str = "#stage", side: int | None = None) -> np.ndarray:
    """What the page shows of `selector` (inside its border; `side`: its top left square)."""
    x, y, w, h = page.locator(selector).evaluate(
        "e => { const r = e.getBoundingClientRect(); return [r.x + e.clientLeft, "
        "r.y + e.clientTop, e.clientWidth, e.clientHeight]; }")
    clip = {"x": round(x), "y": round(y), "width": side or w, "height": side or h}
    return np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"))


def test_page_files_are_served_under_the_prefix_with_their_types_and_the_csp(server):
    """Plain HTTP, no browser and no key: each of the page's files, byte for byte, with its
    type, the CSP and nosniff; the bare prefix redirects to itself with a slash."""
    from scale.page import CSP, FILES
    parts = urlsplit(server)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    for route, (name, media) in FILES.items():
        conn.request("GET", PREFIX + route)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == (REPO / "scale" / "static" / name).read_bytes()
        assert r.getheader("Content-Type") == media
        assert r.getheader("Content-Security-Policy") == CSP
        assert r.getheader("X-Content-Type-Options") == "nosniff"
    conn.request("GET", PREFIX)
    r = conn.getresponse()
    r.read()
    assert r.status == 308 and r.getheader("Location") == PREFIX.lstrip("/") + "/"
    conn.request("POST", PREFIX + "/restore", body=b"x")
    r = conn.getresponse()
    assert r.status == 401 and b"--api-key" in r.read()  # the page is open, the service not
    assert "default-src 'self'" in CSP and "unsafe" not in CSP


def test_route_prefix_option_is_normalised_or_refused():
    import click

    from scale.serve_cli import _route_prefix
    for given, want in (("/", "/"), ("", "/"), ("sodiff", "/sodiff"), ("/a/b/", "/a/b")):
        assert _route_prefix(None, None, given) == want
    with pytest.raises(click.BadParameter, match="letters, digits"):
        _route_prefix(None, None, "/a b?")


@pytest.mark.browser
def test_a_restore_in_the_page_shows_the_headers_and_downloads_the_response(
        watched, server, photo, direct, tmp_path):
    page = open_page(watched, server)  # the bare prefix: redirected to PREFIX/
    assert page.url == server + "/"
    assert page.locator("#result").is_hidden()
    got = restore_with_key(page, photo)
    shown = got.all_headers()  # what the page got, lower-case names
    want, png = direct
    for element, header in (("tau", "Tau"), ("tau-source", "Tau-Source"), ("qf", "QF"),
                            ("qf-header", "QF-Header"), ("gate", "Gate"),
                            ("constraint", "Constraint")):
        text = page.locator(f"#{element}").text_content()
        assert text == shown[f"x-sodiff-{header.lower()}"] == want[f"X-SODiff-{header}"]
    assert page.locator("#batch").text_content() == shown["x-sodiff-batch"]
    rows = [(r.locator("th").text_content(), r.locator("td").text_content())
            for r in page.locator("#timings tr").all()]
    timing = [p.strip().split(";dur=") for p in shown["server-timing"].split(",")]
    assert rows == [(name, f"{dur} ms") for name, dur in timing]
    assert [r[0] for r in rows] == [p.strip().split(";")[0]
                                    for p in want["Server-Timing"].split(",")]
    assert "total" in dict(rows)
    assert page.locator("#size").text_content() == f"{PHOTO_SIDE} x {PHOTO_SIDE} px"
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "astronaut_sodiff.png"
    assert Path(download.value.path()).read_bytes() == png

    page.click("button[data-zoom='2']")  # the screenshot: at 2x, half JPEG, half restored
    path = SCREENSHOT if os.environ.get("SODIFF_WRITE_SCREENSHOT") == "1" else \
        tmp_path / SCREENSHOT.name
    bottom = page.locator("#result").evaluate("e => e.getBoundingClientRect().bottom")
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": 960,  # no empty margin
                                          "height": round(bottom) + 16})
    assert Image.open(path).width == 960
    watched.check(401)


@pytest.mark.browser
def test_the_slider_shows_each_side_and_zoom_and_pan_move_the_view(watched, server, photo,
                                                                     direct):
    page = open_page(watched, server + "/")
    restore_with_key(page, photo)
    restored = np.asarray(Image.open(io.BytesIO(direct[1])).convert("RGB"))
    jpeg = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    split = page.locator("#split")
    split.focus()
    page.keyboard.press("Home")  # 0: the restored image over the whole view
    assert split.input_value() == "0" and page.locator("#divider").is_hidden()
    assert np.array_equal(shot(page), restored)
    page.keyboard.press("End")   # 100: the JPEG (the browser's own decoder: off by a level)
    assert np.abs(shot(page).astype(int) - jpeg).mean() < 1.5
    split.fill("25")  # a quarter JPEG, the rest restored
    assert "25%" in page.locator("#after").evaluate("e => e.style.clipPath")
    view = shot(page).astype(int)
    assert np.abs(view[:, :60] - jpeg[:, :60]).mean() < 1.5
    assert np.array_equal(view[:, 70:], restored[:, 70:])

    split.fill("0")
    page.click("button[data-zoom='4']")
    box = page.locator("#stage").bounding_box()
    assert (box["width"], box["height"]) == (4 * PHOTO_SIDE, 4 * PHOTO_SIDE)
    assert page.locator("button[data-zoom='4']").get_attribute("aria-pressed") == "true"
    viewer = page.locator("#viewer")
    viewer.evaluate("v => { v.scrollLeft = 0; v.scrollTop = 0; }")
    # pixels repeated 4x4, nothing smoothed
    assert np.array_equal(shot(page, "#viewer", 200), np.kron(restored[:50, :50],
                                                   np.ones((4, 4, 1), np.uint8)))
    v = viewer.bounding_box()
    page.mouse.move(v["x"] + 400, v["y"] + 300)
    page.mouse.down()
    page.mouse.move(v["x"] + 340, v["y"] + 200, steps=5)
    page.mouse.up()
    assert viewer.evaluate("v => [v.scrollLeft, v.scrollTop]") == [60, 100]
    watched.check(401)


@pytest.mark.browser
def test_errors_are_the_servers_own_lines_and_the_page_never_goes_blank(watched, server,
                                                                         photo):
    page = open_page(watched, server + "/")
    text = b"this is not an image\n"
    line400 = post(server, text, key=API_KEY)[2].decode().strip()
    line401 = post(server, text, key="wrong")[2].decode().strip()
    line413 = post(server, b"x" * (MAX_BYTES + 1), key=API_KEY)[2].decode().strip()
    assert "not an image" in line400 and "--api-key" in line401 and "over the limit" in line413

    notes = [{"name": "notes.txt", "mimeType": "text/plain", "buffer": text}]
    assert answer(page, lambda: page.set_input_files("#file", files=notes)).status == 401
    assert status(page) == (line401, "401") and page.locator("#key-form").is_visible()
    assert answer(page, lambda: give_key(page, "wrong")).status == 401
    assert status(page) == (line401, "401") and page.locator("#key-form").is_visible()
    assert answer(page, lambda: give_key(page, API_KEY)).status == 400  # the same file again
    assert status(page) == (line400, "400") and page.locator("#key-form").is_hidden()
    assert page.locator("header").is_visible() and page.locator("#status").is_visible()

    assert answer(page, lambda: page.set_input_files("#file", photo)).status == 200
    tau = page.locator("#tau").text_content()  # a result, then errors beside it
    dropped = answer(page, lambda: page.evaluate("""text => {  // as a drag from the desktop
        const data = new DataTransfer();
        data.items.add(new File([text], "dropped.jpg", {type: "image/jpeg"}));
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true,
                                                           cancelable: true}));
    }""", text.decode()))
    assert dropped.status == 400 and status(page) == (line400, "400")
    big = [{"name": "big.jpg", "mimeType": "image/jpeg", "buffer": b"x" * (MAX_BYTES + 1)}]
    assert answer(page, lambda: page.set_input_files("#file", files=big)).status == 413
    assert status(page) == (line413, "413")
    assert page.locator("#result").is_visible() and page.locator("#tau").text_content() == tau
    watched.check(400, 401, 413)


@pytest.mark.browser
def test_the_watchers_see_a_csp_violation_and_a_request_off_the_service(watched, server):
    """The checks above would notice: an inline script is refused (and reported on the
    console), and a request to another host is cut off (and recorded)."""
    page = open_page(watched, server + "/")
    ran = page.evaluate("""() => {
        const s = document.createElement("script");
        s.textContent = "window.injected = 1";
        document.head.append(s);
        return window.injected === 1;
    }""")
    assert not ran
    page.wait_for_timeout(200)
    assert any("Content Security Policy" in e for e in watched.errors), watched.errors
    from playwright.sync_api import Error
    with pytest.raises(Error):
        page.goto("http://192.0.2.1/elsewhere")
    assert watched.outside == ["http://192.0.2.1/elsewhere"]
