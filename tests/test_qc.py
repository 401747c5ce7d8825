"""QC pictures of tissue detection: outline on the mask border, one square per kept tile, contact sheets."""

from __future__ import annotations

import numpy as np

from her2ray.tiling.qc import (CAPTION_PX, OUTLINE_RGB, TILE_RGB, contact_sheet, failed_cell, mask_outline,
                               qc_image)


def _is(img, rgb):
    return np.all(img == rgb, axis=-1)


def test_qc_image_draws_outline_and_kept_tiles_only():
    thumb = np.full((100, 200, 3), 240, np.uint8)            # slide 2000 x 1000 level-0 px, 10x downsample
    mask = np.zeros((50, 100), bool)                           # mask at half the thumbnail's resolution
    mask[10:40, 20:60] = True
    x, y = np.array([400, 800]), np.array([200, 200])          # two 400-px tiles -> 40-px squares
    img = qc_image(thumb, mask, x, y, 400.0, (2000, 1000), caption="s1: 2 tiles")
    assert img.shape == (100 + CAPTION_PX, 200, 3)
    outline = _is(img[:100], OUTLINE_RGB)
    # the outline is the border of the mask region scaled to the thumbnail: rows 20..79, cols 40..119
    # (tile squares are drawn on top, so check the border where no tile lies)
    assert outline[79, 41:119].all() and outline[61:79, 40].all() and outline[61:79, 119].all()
    assert not outline[30:70, 50:110].any() and not outline[:15].any()
    squares = _is(img[:100], TILE_RGB)
    assert squares[20, 40:80].all() and squares[20, 80:120].all() and squares[20:60, 40].all()
    assert not squares[61:].any() and not squares[:, 121:].any() and not squares[25:55, 45:75].any()
    assert not (img[100:] == 255).all()                        # caption text drawn


def test_mask_outline_and_contact_sheet():
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    edge = mask_outline(m)
    assert edge.sum() == 6 * 4 - 4 and not edge[3:7, 3:7].any()
    cells = [np.full((100, 80, 3), i * 20, np.uint8) for i in range(8)] + [failed_cell("no tissue")]
    sheet = contact_sheet(cells, [f"s{i}" for i in range(9)], columns=6, cell_px=64, gap_px=4)
    assert sheet.shape == (2 * (64 + CAPTION_PX + 4) + 4, 6 * (64 + 4) + 4, 3)
    assert (sheet[4:10, 4:10] == 0).all() and (sheet[4:10, 72:78] == 20).all()   # row-major order
