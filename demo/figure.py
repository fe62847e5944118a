"""The side-by-side comparison: JPEG | restored | original, whole and as zoomed crops."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CROP = 96          # crop side in pixels (a multiple of the 8x8 JPEG block)
ZOOM = 4           # crops are enlarged with nearest-neighbour, so every block edge shows;
#                    CROP * ZOOM = PANEL: crops as wide as the whole images
PANEL = 384        # width of each whole-image panel
LABEL_H = 24       # caption strip above each column
BOX = (255, 64, 64)
BLOCK = 8          # crops start on the JPEG block grid


def _font(size: int = 15) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: the fixed bitmap font
        return ImageFont.load_default()


def worst_crops(jpeg: np.ndarray, original: np.ndarray, n: int = 2, side: int = CROP
                ) -> list[tuple[int, int]]:
    """Top-left corners of the `n` block-aligned, non-overlapping `side` squares where the
    JPEG differs most from the original: where artifacts are easiest to see."""
    b = BLOCK
    h, w = (d // b for d in original.shape[:2])
    k = side // b
    if side % b or k > min(h, w):
        return []
    err = ((jpeg.astype(np.float64) - original) ** 2).reshape(*original.shape[:2], -1).mean(-1)
    blocks = err[:h * b, :w * b].reshape(h, b, w, b).sum((1, 3))
    c = np.pad(blocks.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]  # sum over k x k blocks
    picked: list[tuple[int, int]] = []
    for flat in np.argsort(-windows, axis=None, kind="stable"):
        y, x = (int(v) * b for v in np.unravel_index(flat, windows.shape))
        if all(abs(y - py) >= side or abs(x - px) >= side for py, px in picked):
            picked.append((y, x))
            if len(picked) == n:
                break
    return picked


def comparison(columns: list[tuple[str, np.ndarray]], crops: list[tuple[int, int]],
               side: int = CROP) -> Image.Image:
    """Whole images on top (crop boxes drawn), one row of zoomed crops per box below."""
    h, w = columns[0][1].shape[:2]
    scale = PANEL / w
    panel_h = round(h * scale)
    cell = side * ZOOM
    col_w = max(PANEL, cell)
    sheet = Image.new("RGB", (col_w * len(columns), LABEL_H + panel_h + cell * len(crops)),
                      "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for j, (label, img) in enumerate(columns):
        x0 = j * col_w
        draw.text((x0 + 4, 4), label, fill="black", font=font)
        whole = Image.fromarray(img).convert("RGB").resize((PANEL, panel_h), Image.LANCZOS)
        sheet.paste(whole, (x0, LABEL_H))
        for i, (y, x) in enumerate(crops):
            box = [x0 + x * scale, LABEL_H + y * scale, x0 + (x + side) * scale,
                   LABEL_H + (y + side) * scale]
            draw.rectangle(box, outline=BOX, width=2)
            tile = Image.fromarray(img[y:y + side, x:x + side]).convert("RGB")
            sheet.paste(tile.resize((cell, cell), Image.NEAREST),
                        (x0, LABEL_H + panel_h + i * cell))
    return sheet
