"""Synthetic H&E-like whole-slide images (pyramidal JPEG TIFF that OpenSlide opens) and labelled cohorts.

``write_synthetic_slide(path, width_px, height_px, mpp=0.5, label=None, seed=0, ...)`` writes one slide;
``synth_cohort(out_dir, n_slides, n_centers=2, seed=0, ...)`` writes slides plus manifest.csv.
"""

from .cohort import MANIFEST_COLUMNS, center_color_shift, synth_cohort, write_manifest
from .layout import SIGNAL_FRACTIONS, SlideLayout, make_layout
from .pyramid import pyramid_shapes, write_pyramidal_tiff
from .render import TilePainter
from .slide import write_synthetic_slide

__all__ = [
    "MANIFEST_COLUMNS", "SIGNAL_FRACTIONS", "SlideLayout", "TilePainter", "center_color_shift",
    "make_layout", "pyramid_shapes", "synth_cohort", "write_manifest", "write_pyramidal_tiff",
    "write_synthetic_slide",
]
