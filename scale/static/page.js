// sodiff-serve's before/after page: send a chosen or dropped image to `restore`, show the
// JPEG and the result under a slider with pan and zoom, the X-SODiff-* and Server-Timing
// values exactly as the headers give them, and the server's one-line errors as they are.
// URLs are relative (the page works under any --route-prefix); nothing is stored anywhere:
// the API key lives in this tab's memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const PREFIX = "X-SODiff-";
// element id: header name after PREFIX
const FACTS = { tau: "Tau", "tau-source": "Tau-Source", qf: "QF", "qf-header": "QF-Header",
                gate: "Gate", constraint: "Constraint", batch: "Batch" };
const NONE = "none";  // a header the response left out (e.g. no QF header for a PNG input)

const state = { key: null, pending: null, busy: false, urls: [], zoom: 1, size: null };

function say(text, code) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", code !== undefined);
  if (typeof code === "number") status.dataset.code = String(code);
  else delete status.dataset.code;
}

function firstLine(text, fallback) {
  const line = text.split("\n").map((s) => s.trim()).find((s) => s);
  return line || fallback;
}

async function restore(file) {
  if (state.busy) return;
  state.busy = true;
  document.body.classList.add("busy");
  say(`restoring ${file.name} (${file.size.toLocaleString("en")} bytes)\u2026`);
  try {
    await send(file);
  } catch (e) {  // anything unforeseen still ends in a line, never a blank page
    say(`the page failed: ${e && e.message ? e.message : e}`, "page");
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
  }
}

async function send(file) {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  let response;
  try {
    response = await fetch("restore?format=png", { method: "POST", body: file, headers });
  } catch (e) {
    say(`could not reach sodiff-serve (${e.message}); is it still running?`, "network");
    return;
  }
  const refused = response.status === 401;  // ask for the key in the page, then send again
  state.pending = refused ? file : null;
  $("key-form").hidden = !refused;
  if (refused) {
    $("key").focus();
    $("key").select();
  }
  if (!response.ok) {
    say(firstLine(await response.text(), response.statusText || "no message"), response.status);
    return;
  }
  await show(file, await response.blob(), response.headers);
}

async function decoded(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  return img;
}

async function show(file, blob, headers) {
  const beforeUrl = URL.createObjectURL(file);
  const afterUrl = URL.createObjectURL(blob);
  const after = await decoded(afterUrl);
  let beforeShown = true;
  try {
    await decoded(beforeUrl);
  } catch {
    beforeShown = false;  // a format the server reads but this browser cannot show
  }
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [beforeUrl, afterUrl];
  $("before").src = beforeShown ? beforeUrl : afterUrl;
  $("after").src = afterUrl;
  state.size = [after.naturalWidth, after.naturalHeight];

  $("size").textContent = `${state.size[0]} x ${state.size[1]} px`;
  $("bytes").textContent = `${file.size.toLocaleString("en")} in, ` +
    `${blob.size.toLocaleString("en")} out (PNG)`;
  for (const [id, name] of Object.entries(FACTS)) {
    $(id).textContent = headers.get(PREFIX + name) ?? NONE;
  }
  showTimings(headers.get("Server-Timing") || "");
  const link = $("download");
  link.href = afterUrl;
  link.download = `${file.name.replace(/\.[^.]*$/, "") || "image"}_sodiff.png`;

  $("result").hidden = false;
  setZoom(state.zoom);
  say(beforeShown ? `${file.name}: restored` : `${file.name}: restored (this browser cannot ` +
      "show the file sent, so both sides show the result)");
}

// "saipe;dur=1.2, unet;dur=30.5" -> one row per stage, each value as the header gives it
function showTimings(header) {
  const table = $("timings");
  table.replaceChildren();
  for (const part of header.split(",")) {
    const [name, ...params] = part.trim().split(";");
    if (!name) continue;
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    const row = table.insertRow();
    const th = document.createElement("th");
    th.textContent = name;
    row.append(th);
    row.insertCell().textContent = dur ? `${dur.slice(4)} ms` : "";
  }
}

function setSplit(percent) {
  $("after").style.clipPath = `inset(0 0 0 ${percent}%)`;  // the JPEG left, the result right
  $("divider").style.left = `${percent}%`;
  $("divider").hidden = percent <= 0 || percent >= 100;
}

// Zoom about the centre of what is in view.
function setZoom(zoom) {
  const viewer = $("viewer");
  const cx = (viewer.scrollLeft + viewer.clientWidth / 2) / (viewer.scrollWidth || 1);
  const cy = (viewer.scrollTop + viewer.clientHeight / 2) / (viewer.scrollHeight || 1);
  state.zoom = zoom;
  if (state.size) {
    $("stage").style.width = `${state.size[0] * zoom}px`;
    $("stage").style.height = `${state.size[1] * zoom}px`;
  }
  for (const b of document.querySelectorAll("button[data-zoom]")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.zoom) === zoom));
  }
  viewer.scrollLeft = cx * viewer.scrollWidth - viewer.clientWidth / 2;
  viewer.scrollTop = cy * viewer.scrollHeight - viewer.clientHeight / 2;
}

function panning(viewer) {
  let from = null;
  viewer.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    from = { x: e.clientX, y: e.clientY, left: viewer.scrollLeft, top: viewer.scrollTop };
    viewer.setPointerCapture(e.pointerId);
    viewer.classList.add("panning");
  });
  viewer.addEventListener("pointermove", (e) => {
    if (!from) return;
    viewer.scrollLeft = from.left - (e.clientX - from.x);
    viewer.scrollTop = from.top - (e.clientY - from.y);
  });
  const end = () => { from = null; viewer.classList.remove("panning"); };
  viewer.addEventListener("pointerup", end);
  viewer.addEventListener("pointercancel", end);
}

function dropping() {
  let depth = 0;  // dragenter/dragleave fire for every child crossed
  document.addEventListener("dragenter", (e) => {
    e.preventDefault();
    depth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) document.body.classList.remove("dragging");
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();  // else the browser opens the file itself
    depth = 0;
    document.body.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) restore(file);
    else say("drop an image file (a JPEG, PNG or WebP)", "drop");
  });
}

function start() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";  // the same file chosen again is a new change
    if (file) restore(file);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value;
    if (state.pending) restore(state.pending);
  });
  $("split").addEventListener("input", (e) => setSplit(Number(e.target.value)));
  for (const b of document.querySelectorAll("button[data-zoom]")) {
    b.addEventListener("click", () => setZoom(Number(b.dataset.zoom)));
  }
  panning($("viewer"));
  dropping();
  setSplit(Number($("split").value));
  document.body.dataset.ready = "1";  // for tests: the handlers are in place
}

start();
