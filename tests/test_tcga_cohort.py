"""``her2ray cohort tcga``: GDC Biotab clinical file + TCGA slide names -> manifest and a report of the rest.

The clinical fixture is written in the published layout of ``nationwidechildrens.org_clinical_patient_brca.txt``:
tab-separated, row 1 field names, row 2 CDE names, row 3 ``CDE_ID:`` codes, bracketed missing values.
"""

from __future__ import annotations

import csv
import json
import uuid

import pytest

from her2ray.cli import main
from her2ray.cohorts.tcga import build_tcga_cohort, read_clinical
from her2ray.errors import ManifestError

HEADER = ["bcr_patient_uuid", "bcr_patient_barcode", "form_completion_date", "er_status_by_ihc",
          "her2_status_by_ihc", "her2_ihc_score", "her2_fish_status"]
CDE_NAMES = ["bcr_patient_uuid", "bcr_patient_barcode", "form_completion_date",
             "breast_carcinoma_estrogen_receptor_status", "lab_proc_her2_neu_immunohistochemistry_receptor_status",
             "her2_immunohistochemistry_level_result", "lab_procedure_her2_neu_in_situ_hybrid_outcome_type"]
CDE_IDS = ["CDE_ID:", "CDE_ID:2003301", "CDE_ID:", "CDE_ID:2957359", "CDE_ID:2957563", "CDE_ID:2178404",
           "CDE_ID:2854089"]
PATIENTS = [  # barcode, status by IHC, IHC level, FISH
    ("TCGA-A1-A0SB", "Negative", "0", "[Not Evaluated]"),
    ("TCGA-A1-A0SD", "Negative", "1+", "[Not Evaluated]"),
    ("TCGA-A2-A04P", "Equivocal", "2+", "Negative"),        # HER2-low, ISH-negative
    ("TCGA-A2-A04Q", "Equivocal", "2+", "[Not Available]"),  # equivocal
    ("TCGA-AR-A1AR", "Positive", "3+", "[Not Evaluated]"),
    ("TCGA-AR-A1AS", "Positive", "[Not Available]", "Positive"),  # no IHC level: no 4-class label
    ("TCGA-BH-A0B3", "Negative", "3+", "[Not Evaluated]"),   # level/status conflict
    ("TCGA-E2-A14N", "Negative", "0", "[Not Evaluated]"),    # no slide
]


def write_clinical(path) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerows([HEADER, CDE_NAMES, CDE_IDS])
        for bc, status, level, fish in PATIENTS:
            w.writerow([str(uuid.uuid4()).upper(), bc, "2011-1-5", "Positive", status, level, fish])
    return str(path)


def slide_names() -> list[str]:
    u = lambda: str(uuid.uuid4())  # noqa: E731
    return [f"TCGA-A1-A0SB-01Z-00-DX1.{u()}.svs", f"TCGA-A1-A0SB-01A-01-TS1.{u()}.svs",   # DX kept, frozen dropped
            f"TCGA-A1-A0SD-01Z-00-DX1.{u()}.svs", f"TCGA-A2-A04P-01Z-00-DX1.{u()}.svs",
            f"TCGA-A2-A04Q-01Z-00-DX1.{u()}.svs", f"TCGA-AR-A1AR-01Z-00-DX1.{u()}.svs",
            f"TCGA-AR-A1AR-01A-01-BS1.{u()}.svs", f"TCGA-AR-A1AS-01Z-00-DX1.{u()}.svs",
            f"TCGA-BH-A0B3-01Z-00-DX1.{u()}.svs", f"TCGA-ZZ-A000-01Z-00-DX1.{u()}.svs",   # not in clinical
            f"TCGA-A1-A0SD-11A-01-TS1.{u()}.svs", "notes.svs"]


def check(cohort, prefix: str):
    rows = {r["patient_id"]: r for r in cohort.rows}
    assert sorted(rows) == ["TCGA-A1-A0SB", "TCGA-A1-A0SD", "TCGA-A2-A04P", "TCGA-A2-A04Q", "TCGA-AR-A1AR",
                            "TCGA-BH-A0B3"]
    assert [rows[p]["her2_score"] for p in sorted(rows)] == ["0", "1+", "2+", "2+", "3+", "3+"]
    assert rows["TCGA-A2-A04P"]["her2_status"] == "negative" and rows["TCGA-A2-A04Q"]["her2_status"] == "equivocal"
    assert rows["TCGA-AR-A1AR"]["slide_id"] == "TCGA-AR-A1AR-01Z-00-DX1" and rows["TCGA-AR-A1AR"]["center"] == "AR"
    assert all(r["path"].startswith(prefix) and r["slide_type"] == "DX" for r in cohort.rows)
    reasons = sorted(d["reason"].split(" (")[0].split(";")[0] for d in cohort.dropped_slides)
    assert reasons == ["file name is not a TCGA slide barcode", "frozen bottom section", "frozen top section",
                       "frozen top section"]
    unl = {d["patient_id"]: d["reason"] for d in cohort.unlabelled_slides}
    assert unl == {"TCGA-AR-A1AS": "no HER2 IHC level for this patient",
                   "TCGA-ZZ-A000": "patient not in the clinical file"}
    assert cohort.patients_without_slide == ["TCGA-E2-A14N"]
    assert [e["patient_id"] for e in cohort.equivocal] == ["TCGA-A2-A04Q"]
    assert [c["patient_id"] for c in cohort.conflicts] == ["TCGA-BH-A0B3"]


def test_tcga_cohort_from_a_local_gdc_download(tmp_path, capsys):
    clinical = write_clinical(tmp_path / "nationwidechildrens.org_clinical_patient_brca.txt")
    slides = tmp_path / "gdc"
    for name in slide_names():     # the GDC client writes <file uuid>/<file name>
        d = slides / str(uuid.uuid4())
        d.mkdir(parents=True)
        (d / name).write_bytes(b"")
    check(build_tcga_cohort(clinical, str(slides)), str(slides))
    out = tmp_path / "tcga.csv"
    assert main(["cohort", "tcga", "--clinical", clinical, "--slides", str(slides), "--out", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["her2_score"] in ("0", "1+", "2+", "3+")
    report = json.loads((tmp_path / "tcga.tcga.json").read_text())
    assert report["settings"]["frozen_dropped"] == ["BS", "MS", "TS"] and report["n_patients"] == 6
    assert "Equivocal cases: 1" in (tmp_path / "tcga.tcga.md").read_text()
    assert "6 slides of 6 patients" in capsys.readouterr().out


def test_tcga_cohort_from_an_s3_listing(tmp_path, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    for name in slide_names():
        fs.pipe(f"{s3_bucket}/brca/{uuid.uuid4()}/{name}", b"x")
    clinical = write_clinical(tmp_path / "clin.txt")
    check(build_tcga_cohort(clinical, f"{s3_bucket}/brca"), f"{s3_bucket}/brca/")


def test_bad_clinical_values_name_file_row_and_column(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("\t".join(HEADER) + "\n" + "\t".join(CDE_NAMES) + "\n" + "\t".join(CDE_IDS) + "\n"
                   + "\t".join(["u", "TCGA-A1-A0SB", "d", "Positive", "Positive", "4+", "x"]) + "\n")
    with pytest.raises(ManifestError) as exc:
        read_clinical(str(bad))
    assert exc.value.row == 4 and exc.value.column == "her2_ihc_score" and str(bad) in str(exc.value)
    (tmp_path / "x.txt").write_text("patient\tscore\nA\t1\n")
    with pytest.raises(ManifestError, match="bcr_patient_barcode"):
        read_clinical(str(tmp_path / "x.txt"))
