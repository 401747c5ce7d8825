"""TCGA-BRCA cohort builder: GDC clinical file + diagnostic-slide listing -> labelled her2ray manifest.

Clinical input (what a user downloads from the GDC, documented in README "TCGA-BRCA"):

* GDC BCR Biotab ``nationwidechildrens.org_clinical_patient_brca.txt``: tab-separated, **three header rows**:
  row 1 the field names (used as the header), row 2 the long CDE names, row 3 the ``CDE_ID:...`` codes; then one
  row per patient. HER2 fields: ``her2_ihc_score`` (``0``, ``1+``, ``2+``, ``3+``), ``her2_status_by_ihc``
  (``Positive``/``Negative``/``Equivocal``/``Indeterminate``), ``her2_fish_status`` (same values). Missing
  values are bracketed: ``[Not Available]``, ``[Not Evaluated]``, ``[Unknown]``, ``[Not Applicable]``,
  ``[Discrepancy]``.
* Broad Firehose / TCGAbiolinks "legacy" names are accepted as aliases:
  ``her2_immunohistochemistry_level_result`` (IHC level), ``lab_proc_her2_neu_immunohistochemistry_receptor_status``
  (status by IHC), ``lab_procedure_her2_neu_in_situ_hybrid_outcome_type`` (ISH/FISH).

Slides: a local folder or ``s3://`` prefix, searched recursively for ``*.svs`` (the GDC client writes
``<file_uuid>/<name>.svs``). File names are TCGA slide barcodes, ``TCGA-TSS-PPPP-SSV-PPR-TTN.<uuid>.svs``
(e.g. ``TCGA-A1-A0SB-01Z-00-DX1.<uuid>.svs``): patient = first three fields, ``SS`` sample type (01 primary
tumour), ``TT`` slide type: ``DX`` = FFPE diagnostic slide (kept), ``TS``/``BS``/``MS`` = frozen top/bottom/
middle section (dropped: frozen-section morphology differs from the FFPE slides HER2 is scored on). Every
dropped file is listed with its reason.

Labels: ``her2_score`` = the IHC level (the 4-class target). ``her2_status``: 3+ positive; 0 / 1+ negative;
2+ positive or negative by ISH, else ``equivocal``; without an IHC level the status comes from the status-by-IHC
field (or ISH). A slide whose patient has no IHC level has no training label: listed, not in the manifest.
The tissue-source-site code (``TSS``) is written as ``center``: TCGA's sites are its centers.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..errors import ManifestError
from ..labels import parse_her2_score, score_name

BARCODE_COLUMN = "bcr_patient_barcode"
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "ihc_score": ("her2_ihc_score", "her2_immunohistochemistry_level_result"),
    "ihc_status": ("her2_status_by_ihc", "lab_proc_her2_neu_immunohistochemistry_receptor_status"),
    "fish_status": ("her2_fish_status", "lab_procedure_her2_neu_in_situ_hybrid_outcome_type"),
}
SLIDE_RE = re.compile(r"^(?P<patient>TCGA-(?P<tss>[A-Z0-9]{2})-[A-Z0-9]{4})-(?P<sample>\d{2})(?P<vial>[A-Z])-"
                      r"(?P<portion>\d{2})-(?P<kind>[A-Z]{2})(?P<n>[0-9A-Z]+)(?:\.(?P<uuid>[0-9a-fA-F-]{36}))?$")
PATIENT_RE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$")
FROZEN_KINDS = {"TS": "frozen top section", "BS": "frozen bottom section", "MS": "frozen middle section"}
KEEP_KINDS = ("DX",)
MANIFEST_COLUMNS = ("slide_id", "path", "patient_id", "center", "her2_score", "her2_status", "her2_ihc_status",
                    "her2_fish_status", "slide_type", "sample_type")


def _missing(value: Any) -> bool:
    text = "" if value is None else str(value).strip()
    return text == "" or (text.startswith("[") and text.endswith("]")) or text.lower() in ("na", "nan", "none")


def _status(value: Any) -> str | None:
    """positive / negative / equivocal / indeterminate, or None when missing."""
    if _missing(value):
        return None
    text = str(value).strip().lower()
    for word in ("positive", "negative", "equivocal", "indeterminate"):
        if text.startswith(word):
            return word
    return None


@dataclass
class ClinicalRow:
    patient_id: str
    her2_score: int | None
    ihc_status: str | None
    fish_status: str | None
    row: int

    @property
    def her2_status(self) -> str | None:
        if self.her2_score is not None:
            if self.her2_score == 3:
                return "positive"
            if self.her2_score in (0, 1):
                return "negative"
            return self.fish_status if self.fish_status in ("positive", "negative") else "equivocal"
        if self.fish_status in ("positive", "negative"):
            return self.fish_status
        return self.ihc_status


def read_clinical(url: str) -> list[ClinicalRow]:
    """Patients from a Biotab (or Firehose-named) clinical table; header rows 2-3 are skipped by content.

    Errors name the file, the row (1-based data row of the file, header = row 1) and the column.
    """
    text = storage.read_text(url)
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ManifestError("empty clinical file", file=url) from None
    if BARCODE_COLUMN not in header:
        raise ManifestError(f"no {BARCODE_COLUMN} column (is this nationwidechildrens.org_clinical_patient_brca.txt, "
                            "tab-separated?)", file=url, column=BARCODE_COLUMN)
    cols = {}
    for key, names in FIELD_ALIASES.items():
        cols[key] = next((header.index(n) for n in names if n in header), None)
    if cols["ihc_score"] is None and cols["ihc_status"] is None:
        raise ManifestError(f"no HER2 IHC column (looked for {FIELD_ALIASES['ihc_score'] + FIELD_ALIASES['ihc_status']})",
                            file=url)
    bc = header.index(BARCODE_COLUMN)
    out, seen = [], set()
    for rownum, rec in enumerate(reader, start=2):
        if not rec or len(rec) <= bc:
            continue
        barcode = rec[bc].strip()
        if barcode == BARCODE_COLUMN or barcode.startswith("CDE_ID") or not barcode:
            continue   # header rows 2 (CDE names) and 3 (CDE ids)
        if not PATIENT_RE.match(barcode):
            raise ManifestError(f"not a TCGA patient barcode: {barcode!r}", file=url, row=rownum, column=BARCODE_COLUMN)
        if barcode in seen:
            raise ManifestError(f"patient {barcode} listed twice", file=url, row=rownum, column=BARCODE_COLUMN)
        seen.add(barcode)

        def get(key: str) -> str | None:
            i = cols[key]
            return rec[i] if i is not None and i < len(rec) else None

        raw_score, score = get("ihc_score"), None
        if not _missing(raw_score):
            try:
                score = parse_her2_score(raw_score)
            except ValueError as exc:
                name = header[cols["ihc_score"]]
                raise ManifestError(str(exc), file=url, row=rownum, column=name) from None
        out.append(ClinicalRow(barcode, score, _status(get("ihc_status")), _status(get("fish_status")), rownum))
    return out


def list_slides(source: str) -> list[str]:
    """Every ``*.svs`` under a local folder or ``s3://`` prefix (recursive), full URLs, sorted."""
    fs, path = storage.filesystem_for(source)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches listings
        pass
    found = [p for p in fs.find(path) if p.lower().endswith(".svs")]
    if storage.is_local(source):
        return sorted(found)
    scheme = str(source).split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in found)


@dataclass
class TcgaCohort:
    rows: list[dict[str, Any]] = field(default_factory=list)           # manifest rows
    dropped_slides: list[dict[str, str]] = field(default_factory=list)  # path, reason
    unlabelled_slides: list[dict[str, str]] = field(default_factory=list)
    patients_without_slide: list[str] = field(default_factory=list)
    equivocal: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        scores: dict[str, int] = {}
        for r in self.rows:
            scores[r["her2_score"]] = scores.get(r["her2_score"], 0) + 1
        return {"n_slides": len(self.rows), "n_patients": len({r["patient_id"] for r in self.rows}),
                "slides_per_score": dict(sorted(scores.items())), "settings": self.settings,
                "dropped_slides": self.dropped_slides, "unlabelled_slides": self.unlabelled_slides,
                "patients_without_slide": self.patients_without_slide, "equivocal": self.equivocal,
                "ihc_score_status_conflicts": self.conflicts}


def build_tcga_cohort(clinical_url: str, slides: str, *, slide_types: tuple[str, ...] = KEEP_KINDS,
                      sample_types: tuple[str, ...] = ("01",)) -> TcgaCohort:
    """Join the clinical table and the slide listing by patient barcode (see module docstring)."""
    patients = {p.patient_id: p for p in read_clinical(clinical_url)}
    cohort = TcgaCohort(settings={"clinical": clinical_url, "slides": slides, "slide_types_kept": list(slide_types),
                                  "sample_types_kept": list(sample_types),
                                  "frozen_dropped": sorted(k for k in FROZEN_KINDS if k not in slide_types)})
    with_slide: set[str] = set()
    used_ids: set[str] = set()
    for path in list_slides(slides):
        name = posixpath.basename(path)[: -len(".svs")]
        m = SLIDE_RE.match(name)
        if not m:
            cohort.dropped_slides.append({"path": path, "reason": "file name is not a TCGA slide barcode"})
            continue
        kind, sample = m["kind"], m["sample"]
        if kind not in slide_types:
            why = FROZEN_KINDS.get(kind, f"slide type {kind}")
            cohort.dropped_slides.append({"path": path, "reason": f"{why} ({kind}); kept: {', '.join(slide_types)}"})
            continue
        if sample not in sample_types:
            cohort.dropped_slides.append({"path": path, "reason": f"sample type {sample}; kept: {', '.join(sample_types)}"})
            continue
        patient = patients.get(m["patient"])
        slide_id = name.split(".", 1)[0]
        if slide_id in used_ids:   # same barcode twice (re-scans): keep both, told apart by the file uuid
            slide_id = f"{slide_id}.{(m['uuid'] or str(len(used_ids)))[:8]}"
        if patient is None or patient.her2_score is None:
            why = "patient not in the clinical file" if patient is None else "no HER2 IHC level for this patient"
            cohort.unlabelled_slides.append({"path": path, "patient_id": m["patient"], "reason": why})
            if patient is not None:
                with_slide.add(patient.patient_id)
            continue
        used_ids.add(slide_id)
        with_slide.add(patient.patient_id)
        status = patient.her2_status
        cohort.rows.append({"slide_id": slide_id, "path": path, "patient_id": patient.patient_id, "center": m["tss"],
                            "her2_score": score_name(patient.her2_score), "her2_status": status or "",
                            "her2_ihc_status": patient.ihc_status or "", "her2_fish_status": patient.fish_status or "",
                            "slide_type": kind, "sample_type": sample})
    for p in patients.values():
        if p.patient_id not in with_slide:
            cohort.patients_without_slide.append(p.patient_id)
        if p.her2_status in ("equivocal", "indeterminate"):
            cohort.equivocal.append({"patient_id": p.patient_id, "her2_score": None if p.her2_score is None
                                     else score_name(p.her2_score), "her2_status": p.her2_status})
        expected = {3: "positive", 0: "negative", 1: "negative", 2: "equivocal"}.get(p.her2_score)
        if expected and p.ihc_status in ("positive", "negative", "equivocal") and p.ihc_status != expected:
            cohort.conflicts.append({"patient_id": p.patient_id, "her2_score": score_name(p.her2_score),
                                     "her2_status_by_ihc": p.ihc_status, "row": p.row})
    return cohort


def write_manifest(rows: list[dict[str, Any]], url: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text_atomic(url, buf.getvalue())
