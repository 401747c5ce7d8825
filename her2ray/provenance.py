"""Provenance: versions and configuration recorded next to every output."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
from typing import Any

from . import __version__, storage

TRACKED_PACKAGES = ("ray", "torch", "torchvision", "open_clip_torch", "openslide-python", "openslide-bin",
                    "pyarrow", "numpy", "scikit-learn", "fsspec", "s3fs")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"her2ray": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def run_record(stage: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The record a stage writes as ``run.json``: stage, config, versions, time."""
    return {
        "stage": stage,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": library_versions(),
        **extra,
    }


def write_run_record(url: str, record: dict[str, Any]) -> None:
    storage.write_text_atomic(url, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
