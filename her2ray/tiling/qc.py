"""Tissue-detection QC pictures: what a person checks, not a bare mask.

One picture per slide: the thumbnail, the tissue outline (green) and the kept tile grid (thin yellow squares),
with a caption (slide id, tiles kept, tissue share). A contact sheet puts many such pictures on one PNG so a lab
can review thousands of slides by scrolling through a few hundred images.

``qc_image`` and ``contact_sheet`` are pure (numpy in, numpy out); ``write_slide_qc`` / ``write_contact_sheets``
do the I/O (local folder or any fsspec URL).
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

OUTLINE_RGB = (0, 200, 70)
TILE_RGB = (255, 215, 0)
FAILED_RGB = (200, 40, 40)
CAPTION_PX = 30
#: slides per contact sheet (6 columns x 5 rows)
SHEET_COLUMNS, SHEET_ROWS = 6, 5


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (h, w)."""
    mh, mw = mask.shape
    h, w = shape
    rows = np.minimum((np.arange(h) * mh / h).astype(int), mh - 1)
    cols = np.minimum((np.arange(w) * mw / w).astype(int), mw - 1)
    return np.asarray(mask, dtype=bool)[rows][:, cols]


def mask_outline(mask: np.ndarray, width_px: int = 1) -> np.ndarray:
    """Pixels on the border of the mask's regions (inside edge), ``width_px`` thick."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    inner = ndimage.binary_erosion(mask, iterations=max(1, int(width_px)), border_value=0)
    return mask & ~inner


def qc_image(thumbnail: np.ndarray, mask: np.ndarray | None, x: np.ndarray, y: np.ndarray,
             tile_size_level0_px: float, slide_dims: tuple[int, int], caption: str = "") -> np.ndarray:
    """RGB uint8 picture: thumbnail + tissue outline + kept tiles (level-0 ``x, y`` top-left corners) + caption."""
    from PIL import Image, ImageDraw

    thumb = np.ascontiguousarray(np.asarray(thumbnail)[..., :3], dtype=np.uint8)
    th, tw = thumb.shape[:2]
    img = thumb.copy()
    if mask is not None and np.size(mask):
        edge = mask_outline(_resize_mask(mask, (th, tw)), width_px=max(1, round(max(th, tw) / 400)))
        img[edge] = OUTLINE_RGB
    sx, sy = tw / float(slide_dims[0]), th / float(slide_dims[1])
    canvas = Image.new("RGB", (tw, th + CAPTION_PX), "white")
    canvas.paste(Image.fromarray(img), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for x0, y0 in zip(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)):
        box = (x0 * sx, y0 * sy, (x0 + tile_size_level0_px) * sx - 1, (y0 + tile_size_level0_px) * sy - 1)
        draw.rectangle(box, outline=TILE_RGB, width=1)
    if caption:
        draw.text((4, th + 4), caption, fill=(0, 0, 0), font=_font(max(12, min(18, tw // 32))))
    return np.asarray(canvas)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def failed_cell(reason: str, size_px: int = 256) -> np.ndarray:
    """A placeholder picture for a slide without a QC picture (red frame, the reason as text)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (size_px, size_px), (245, 235, 235))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, size_px - 1, size_px - 1), outline=FAILED_RGB, width=3)
    words, lines, line = reason.split(), [], ""
    for w in words:
        if line and len(line) + len(w) > size_px // 8:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    lines.append(line)
    for i, text in enumerate(lines[:14]):
        draw.text((8, 8 + 16 * i), text, fill=FAILED_RGB, font=_font(13))
    return np.asarray(canvas)


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str] | None = None,
                  columns: int = SHEET_COLUMNS, cell_px: int = 256, gap_px: int = 6) -> np.ndarray:
    """Pictures scaled to fit ``cell_px`` squares on a white sheet, row-major, each with its caption below
    (drawn at a readable size whatever the picture's scale)."""
    from PIL import Image, ImageDraw

    n = len(images)
    if n == 0:
        raise ValueError("contact_sheet needs at least one picture")
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    cell_h = cell_px + CAPTION_PX
    sheet = Image.new("RGB", (cols * (cell_px + gap_px) + gap_px, rows * (cell_h + gap_px) + gap_px), "white")
    draw = ImageDraw.Draw(sheet)
    for i, arr in enumerate(images):
        im = Image.fromarray(np.asarray(arr, dtype=np.uint8))
        im.thumbnail((cell_px, cell_px))
        r, c = divmod(i, cols)
        left, top = gap_px + c * (cell_px + gap_px), gap_px + r * (cell_h + gap_px)
        sheet.paste(im, (left, top))
        if captions is not None:
            draw.text((left + 2, top + cell_px + 6), str(captions[i])[: cell_px // 7], fill=(0, 0, 0), font=_font(13))
    return np.asarray(sheet)


# ---------------------------------------------------------------------------------------------------- I/O

def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def grid_caption(slide_id: str, grid) -> str:
    tissue = float(np.asarray(grid.mask).mean()) if grid.mask is not None else float("nan")
    return f"{slide_id}: {len(grid)}/{grid.n_grid_cells} tiles, tissue {tissue:.0%}"


def slide_qc_png(reader, grid, slide_id: str, max_px: int = 768) -> bytes:
    """The QC picture of one planned slide (``grid`` from ``plan_tiles(..., keep_mask=True)``) as PNG bytes."""
    thumb = reader.thumbnail(max_px)
    return _png(qc_image(thumb, grid.mask, grid.x, grid.y, grid.tile_size_level0_px, grid.slide_dimensions,
                         caption=grid_caption(slide_id, grid)))


def write_slide_qc(reader, grid, qc_dir: str, slide_id: str,
                   storage_options: Mapping[str, Any] | None = None) -> str:
    """``<qc_dir>/<slide_id>.png``; returns its URL."""
    from .. import storage

    url = storage.join(qc_dir, f"{slide_id}.png")
    storage.write_bytes_atomic(url, slide_qc_png(reader, grid, slide_id), storage_options)
    return url


def write_contact_sheets(qc_dir: str, slides: Iterable[Mapping[str, Any]], per_sheet: int = SHEET_COLUMNS * SHEET_ROWS,
                         storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """``<qc_dir>/contact_sheet_001.png`` ... from the per-slide pictures, in the given order.

    ``slides``: rows with ``slide_id`` and optionally ``status``/``error``/``n_tiles``; a slide without a picture
    (failed before tiling, or skipped as already embedded) gets a placeholder cell saying why.
    """
    from PIL import Image

    from .. import storage

    cells, captions = [], []
    for s in slides:
        sid = str(s["slide_id"])
        status = str(s.get("status") or "")
        url = storage.join(qc_dir, f"{sid}.png")
        try:
            pic = np.asarray(Image.open(io.BytesIO(storage.read_bytes(url, storage_options))).convert("RGB"))
            cells.append(pic[:-CAPTION_PX] if pic.shape[0] > CAPTION_PX else pic)   # its own caption is too small
            captions.append(f"{sid}: {s['n_tiles']} tiles" if s.get("n_tiles") is not None else sid)
        except FileNotFoundError:
            reason = str(s.get("error") or ("already embedded in an earlier run: no new picture"
                                            if status == "skipped" else "no picture"))
            cells.append(failed_cell(reason))
            captions.append(f"{sid}: {status or 'no picture'}")
    urls = []
    for k in range(0, len(cells), per_sheet):
        url = storage.join(qc_dir, f"contact_sheet_{k // per_sheet + 1:03d}.png")
        sheet = contact_sheet(cells[k:k + per_sheet], captions[k:k + per_sheet])
        storage.write_bytes_atomic(url, _png(sheet), storage_options)
        urls.append(url)
    return urls


__all__ = ["contact_sheet", "failed_cell", "mask_outline", "qc_image", "slide_qc_png", "write_contact_sheets",
           "write_slide_qc"]
