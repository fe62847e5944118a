"""Pre-computed text embeddings for stage 1's alignment loss (paper Eq. 4, Sec. 4.1).

Input: a captions file, JSON lines
    {"image": "path.png", "box": [x0, y0, x1, y1], "caption": "..."}
one per captioned crop: `box` is the crop in pixels (x1, y1 exclusive) that the caption describes;
relative `image` paths are resolved against the captions file's folder.

Each caption is tokenized by the base model's CLIP tokenizer, padded/truncated to 77 tokens, and
encoded by its text encoder; the embedding is `last_hidden_state`, which is what SD2.x pipelines
feed the UNet by default (`clip_skip=None`; no attention mask, as SD2.1's text encoder config has
`use_attention_mask` unset). SD2.1 was trained on OpenCLIP's penultimate layer: the diffusers
conversion keeps 23 of its 24 layers, so the final layer here *is* that layer (then
final_layer_norm).

Output store (a folder):
    embeddings-00000.safetensors ...  tensor `embeddings` [rows, 77, D] float16
    index.jsonl                       one line per entry, in captions order:
                                      {"shard", "row", "image" (absolute path), "box", "caption"}
    store.json                        count, tokens, dim, shard names, base and captions paths
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from runtime.cliopts import CONTEXT_SETTINGS, version_option

MAX_TOKENS = 77  # CLIP's context length: the prompt SAIPE learns has as many tokens
SHARD_PATTERN = "embeddings-{:05d}.safetensors"
INDEX_FILE = "index.jsonl"
META_FILE = "store.json"
TENSOR_NAME = "embeddings"
STORE_FORMAT = 1


@dataclass(frozen=True)
class CaptionEntry:
    image: Path                     # absolute path of the source image
    box: tuple[int, int, int, int]  # crop x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    caption: str                    # the text describing that crop


def _parse_line(text: str, folder: Path, where: str, check_images: bool) -> CaptionEntry:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or not {"image", "box", "caption"} <= set(rec):
        raise ValueError(f"{where}: expected an object with keys image, box, caption")
    image, box, caption = rec["image"], rec["box"], rec["caption"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: image must be a non-empty path string")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: caption must be a non-empty string")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)
            or box[0] < 0 or box[1] < 0 or box[2] <= box[0] or box[3] <= box[1]):
        raise ValueError(f"{where}: box {box!r} must be 4 integers x0, y0, x1, y1 with "
                         f"0 <= x0 < x1 and 0 <= y0 < y1")
    path = (folder / image).resolve()
    if check_images:
        _check_image(path, box, where)
    return CaptionEntry(path, tuple(box), caption)


def _check_image(path: Path, box: list[int], where: str) -> None:
    from PIL import Image
    if not path.is_file():
        raise ValueError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except OSError as e:
        raise ValueError(f"{where}: cannot read image {path} ({e})") from None
    if box[2] > w or box[3] > h:
        raise ValueError(f"{where}: box {box} exceeds the {w}x{h} image {path}")


def read_captions(path: str | Path, check_images: bool = True) -> list[CaptionEntry]:
    """Parse and validate a captions file; ValueError names the file and line number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found")
    entries = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                entries.append(_parse_line(line, path.parent, f"{path}:{n}", check_images))
    if not entries:
        raise ValueError(f"{path}: no captions")
    return entries


def load_text_encoder(base_dir: str | Path, device: str | torch.device = "cpu"):
    """(CLIPTokenizer, CLIPTextModel in eval mode) from `base_dir/tokenizer` and
    `base_dir/text_encoder`, offline; FileNotFoundError naming the missing folder."""
    from transformers import CLIPTextModel, CLIPTokenizer
    base = Path(base_dir).expanduser()
    for sub in ("tokenizer", "text_encoder"):
        if not (base / sub).is_dir():
            raise FileNotFoundError(f"base model folder {base} has no '{sub}/' subfolder; pass "
                                    f"--base with a local diffusers copy of Stable Diffusion "
                                    f"2.1-base (nothing is downloaded)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load the tokenizer/text encoder from {base}: "
                                f"{str(e).splitlines()[0]}") from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    """[N, 77, D] float32: `last_hidden_state` of captions padded/truncated to 77 tokens."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    device = next(encoder.parameters()).device
    return encoder(ids.to(device)).last_hidden_state.float().cpu()


def build_store(captions: str | Path, base_dir: str | Path, out_dir: str | Path,
                batch: int = 32, shard_size: int = 1000, device: str = "cpu",
                progress: bool = True) -> int:
    """Encode every caption of `captions` into a new store at `out_dir`; returns the count.

    Written into a temporary sibling folder and renamed at the end, so a failed run leaves
    nothing at `out_dir`. Refuses an existing non-empty `out_dir`.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm
    if batch < 1 or shard_size < 1:
        raise ValueError(f"batch={batch} and shard_size={shard_size} must be >= 1")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} exists and is not an empty folder; choose a new one")
    entries = read_captions(captions)
    tokenizer, encoder = load_text_encoder(base_dir, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards, buf, n_buf, dim = [], [], 0, 0

        def flush(rows: torch.Tensor) -> None:
            name = SHARD_PATTERN.format(len(shards))
            save_file({TENSOR_NAME: rows.half().contiguous()}, str(tmp / name))
            shards.append(name)

        for start in tqdm(range(0, len(entries), batch), desc="text embeddings", unit="batch",
                          disable=not progress):
            emb = encode(tokenizer, encoder, [e.caption for e in entries[start:start + batch]])
            buf, n_buf, dim = buf + [emb], n_buf + len(emb), emb.shape[-1]
            while n_buf >= shard_size:
                rows = torch.cat(buf)
                flush(rows[:shard_size])
                buf, n_buf = [rows[shard_size:]], n_buf - shard_size
        if n_buf:
            flush(torch.cat(buf))
        index = [{"shard": shards[i // shard_size], "row": i % shard_size, "image": str(e.image),
                  "box": list(e.box), "caption": e.caption} for i, e in enumerate(entries)]
        _write_index(tmp, index, shards, entries, base_dir, captions, dim)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return len(entries)


def _write_index(folder: Path, index: list[dict], shards: list[str],
                 entries: list[CaptionEntry], base_dir, captions, dim: int) -> None:
    with (folder / INDEX_FILE).open("w", encoding="utf-8") as f:
        for rec in index:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    meta = {"format": STORE_FORMAT, "count": len(entries), "tokens": MAX_TOKENS, "dim": dim,
            "shards": shards, "base": str(Path(base_dir).expanduser().resolve()),
            "captions": str(Path(captions).expanduser().resolve())}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class EmbeddingStore:
    """Read a store: `store[i] -> (image_path, box, embedding float32 [77, D])`.

    Shards are memory-mapped on first use; the open handles are not pickled, so the store can
    go into DataLoader workers.
    """

    def __init__(self, store_dir: str | Path):
        self.root = Path(store_dir).expanduser()
        index_file = self.root / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a text-embedding store (no {INDEX_FILE})"
                                    f"; build one with `python -m training.text_embeddings`")
        with index_file.open(encoding="utf-8") as f:
            self.entries = [json.loads(line) for line in f if line.strip()]
        missing = sorted({e["shard"] for e in self.entries} -
                         {p.name for p in self.root.glob("embeddings-*.safetensors")})
        if missing:
            raise FileNotFoundError(f"{self.root}: shard files missing: {', '.join(missing)}")
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Path, tuple[int, int, int, int], torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a store of {len(self)}")
        e = self.entries[i]
        return (*self.meta(i), self._shard(e["shard"])[e["row"]].float())

    def meta(self, i: int) -> tuple[Path, tuple[int, int, int, int]]:
        """(image_path, box) of entry `i` without reading its embedding (cheap: for indexing)."""
        e = self.entries[i]
        return Path(e["image"]), tuple(e["box"])

    def _shard(self, name: str):
        if name not in self._handles:
            from safetensors import safe_open
            f = safe_open(str(self.root / name), framework="pt")
            self._handles[name] = f.get_slice(TENSOR_NAME)
        return self._handles[name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--captions", required=True, type=click.Path(path_type=Path),
              help="JSON lines {image, box, caption}; relative image paths are relative to "
                   "this file's folder")
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="local SD2.1-base diffusers folder (uses tokenizer/ and text_encoder/)")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="new store folder (must not exist or be empty)")
@click.option("--batch", default=32, show_default=True, help="captions per encoder call")
@click.option("--shard-size", default=1000, show_default=True, help="embeddings per shard file")
@click.option("--device", default="auto", show_default=True,
              help="torch device; auto = cuda when available, else cpu")
def main(captions: Path, base_dir: Path, out_dir: Path, batch: int, shard_size: int,
         device: str) -> None:
    """Pre-compute the text embeddings of stage 1's captions into a sharded store."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        n = build_store(captions, base_dir, out_dir, batch, shard_size, device)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {n} embeddings to {out_dir}")


if __name__ == "__main__":
    main()
