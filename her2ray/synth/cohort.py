"""``synth_cohort``: a folder of synthetic slides plus the manifest.csv the pipeline starts from.

Classes are balanced (labels cycle 0, 1+, 2+, 3+ before shuffling) and every class is spread evenly over
the centres, so the optional per-centre colour shift is a nuisance variable a model must ignore, not a
shortcut to the label. The manifest's ``mpp`` column is left empty on purpose: the slides carry their
MPP in the file, which is the path real slides take.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

import numpy as np

from .. import storage
from ..labels import HER2_SCORES
from .slide import write_synthetic_slide

MANIFEST_COLUMNS = ("slide_id", "path", "patient_id", "her2_score", "center", "mpp")


def center_color_shift(index: int, strength: float = 0.08) -> tuple[float, float, float]:
    """Per-channel optical-density factors of centre ``index`` (centre 0: none). Mild by default."""
    if index == 0 or strength == 0:
        return (1.0, 1.0, 1.0)
    angle = 2.0 * math.pi * index / 3.0 + 0.5
    r, g, b = math.cos(angle), math.cos(angle - 2 * math.pi / 3), math.cos(angle + 2 * math.pi / 3)
    return (1.0 + strength * r, 1.0 + strength * g, 1.0 + strength * b)


def _center_names(n_centers: int, centers) -> list[str]:
    if centers is None:
        return [f"C{i}" for i in range(n_centers)]
    if isinstance(centers, int):
        return [f"C{i}" for i in range(centers)]
    names = [str(c) for c in centers]
    if not names:
        raise ValueError("centers must not be empty")
    return names


def synth_cohort(out_dir: str, n_slides: int, n_centers: int = 2, seed: int = 0, width_px: int = 2816,
                 height_px: int = 2816, mpp: float = 0.5, *, centers: Sequence[str] | int | None = None,
                 signal_strength: float = 1.0, center_shift: float = 0.08, slides_per_patient: int = 1,
                 tile_px: int = 256, manifest_name: str = "manifest.csv", workers: int = 1) -> list[dict]:
    """Write ``n_slides`` labelled slides to ``<out_dir>/slides/`` and ``<out_dir>/manifest.csv``.

    Returns the manifest rows (dicts with slide_id, path, patient_id, her2_score "0"/"1+"/"2+"/"3+",
    center, mpp = ""). ``centers``: centre names (or a count), overriding ``n_centers``.
    ``center_shift``: strength of the per-centre colour shift (0 disables it). Slides of one patient
    share the patient's label. ``out_dir`` may be local or any fsspec URL. ``workers`` > 1 writes
    slides in that many processes (slide writing is CPU-bound numpy + JPEG).
    """
    if n_slides <= 0:
        raise ValueError(f"n_slides must be positive, got {n_slides}")
    names = _center_names(n_centers, centers)
    rng = np.random.default_rng([int(seed), 0xC0407])
    n_patients = math.ceil(n_slides / max(1, int(slides_per_patient)))
    labels = np.arange(n_patients) % len(HER2_SCORES)
    rng.shuffle(labels)
    # balance centres within each class: the k-th patient of a class goes to centre k mod n_centres
    patient_center = np.zeros(n_patients, dtype=np.int64)
    for cls in range(len(HER2_SCORES)):
        members = np.flatnonzero(labels == cls)
        patient_center[members] = (np.arange(len(members)) + cls) % len(names)

    slides_url = storage.join(str(out_dir), "slides")
    storage.makedirs(slides_url)
    width = max(3, len(str(n_slides - 1)))
    rows, jobs = [], []
    for i in range(n_slides):
        p = i // max(1, int(slides_per_patient))
        label, ci = int(labels[p]), int(patient_center[p])
        slide_id = f"SYN{i:0{width}d}"
        path = storage.join(slides_url, f"{slide_id}.tiff")
        if storage.is_local(path):
            path = os.path.abspath(path)
        jobs.append(dict(path=path, width_px=width_px, height_px=height_px, mpp=mpp, label=label,
                         seed=int(seed) * 100_003 + i, signal_strength=signal_strength, tile_px=tile_px,
                         color_shift=center_color_shift(ci, center_shift)))
        rows.append({"slide_id": slide_id, "path": path, "patient_id": f"P{p:0{width}d}",
                     "her2_score": HER2_SCORES[label], "center": names[ci], "mpp": ""})
    _run_jobs(jobs, workers)
    write_manifest(rows, storage.join(str(out_dir), manifest_name))
    return rows


def _write_job(job: dict) -> str:
    return write_synthetic_slide(**job)


def _run_jobs(jobs: list[dict], workers: int) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _write_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads (Ray, thread pools) that fork would copy half-alive
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        list(pool.map(_write_job, jobs))


def write_manifest(rows: list[dict], url: str) -> None:
    """Write manifest rows as CSV (atomically, local or remote)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text_atomic(url, buf.getvalue())
