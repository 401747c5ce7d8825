"""Regenerate tests/data/cmu1_small_dicom/: the real CMU-1-Small-Region.svs converted to DICOM WSI.

Run from the repository root (needs the dev extras: ``pip install -e ".[dev]"``, which bring wsidicomizer):

    python tests/data/make_dicom_wsi.py [../shared/data/slides/CMU-1-Small-Region.svs]

The conversion reads the slide through OpenSlide (wsidicomizer's OpenSlide source) and re-encodes every
256 px frame as baseline JPEG, quality 90, 4:4:4 (no chroma subsampling): the DICOM tiles differ from the
SVS by that re-encoding only (tests/test_formats.py states the error). UIDs come from a fixed seed, so
the same input gives the same file names. The result is 4 instances (level 0, label, overview,
thumbnail), about 2.2 MB; CMU-1-Small-Region is CC0 1.0 (see ../shared/data/README.md).
"""

from __future__ import annotations

import itertools
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "cmu1_small_dicom"
DEFAULT_SOURCE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
QUALITY, TILE_PX = 90, 256


def convert(source: Path, out: Path = OUT) -> list[str]:
    from pydicom.uid import generate_uid
    from wsidicom.codec import JpegSettings
    from wsidicom.codec.settings import Subsampling
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    counter = itertools.count()

    def uid():  # deterministic UIDs (and so file names) for a reproducible conversion
        return generate_uid(entropy_srcs=["her2ray-cmu1-small-dicom", str(next(counter))])

    if out.exists():
        shutil.rmtree(out)
    return WsiDicomizer.convert(str(source), str(out), preferred_source=SourceIdentifier.OPENSLIDE,
                                tile_size=TILE_PX, workers=1, uid_generator=uid,
                                encoding=JpegSettings(quality=QUALITY, subsampling=Subsampling.R444))


if __name__ == "__main__":
    files = convert(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)
    print("\n".join(sorted(files)))
