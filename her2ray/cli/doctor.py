"""``her2ray doctor``: what a user (or a bug report) needs when something is off.

Versions of her2ray, Python, torch (+ CUDA and GPUs), Ray (and whether a cluster answers at the address),
OpenSlide (Python binding and C library), open_clip; whether S3 credentials and an endpoint are configured
(names of the variables only, never their values); the slide cache location and size. Read-only; never
starts Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from typing import Callable

#: environment variables that carry S3 credentials: doctor reports whether they are set, never their values
S3_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                      "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="versions, GPUs, Ray, OpenSlide, S3 settings, slide cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help="Ray address to probe (default: $RAY_ADDRESS; none = a local Ray would be started)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the Ray GCS port (default 3)")
    p.set_defaults(func=run)


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is exactly what doctor reports
        return f"not importable ({type(exc).__name__}: {exc})"
    return str(getattr(mod, "__version__", "installed (no __version__)"))


def _dist_version(dist: str) -> str:
    """Installed version without importing (importing open_clip takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def torch_lines() -> list[str]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return [f"torch       not importable ({exc})"]
    lines = [f"torch       {torch.__version__} (built for CUDA {torch.version.cuda or 'none: CPU-only wheel'})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"  GPU {i}     {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("  GPUs      none visible (embedding runs on CPU; see README 'Install' for the CPU-only wheel)")
    return lines


def _gcs_reachable(address: str, timeout: float) -> str:
    """'reachable' / 'NOT reachable (...)' for host:port addresses; ray:// and auto are described, not probed."""
    if address in ("auto", "local") or address.startswith(("ray://", "http://", "https://")):
        return f"{address} (not probed: connect with `ray status` or run a command)"
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return f"{address} reachable (GCS port answers)"
    except (OSError, ValueError) as exc:
        return f"{address} NOT reachable ({type(exc).__name__}: {exc})"


def ray_lines(address: str | None, timeout: float) -> list[str]:
    lines = [f"ray         {_version('ray')}"]
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        lines.append(f"  cluster   {_gcs_reachable(address, timeout)}")
    else:
        lines.append("  cluster   no --address / $RAY_ADDRESS: each command starts a private local Ray")
    return lines


def openslide_lines() -> list[str]:
    try:
        import openslide
    except Exception as exc:  # noqa: BLE001
        return [f"openslide   not importable ({exc})"]
    lib = getattr(openslide, "__library_version__", None)
    lib_path = getattr(getattr(openslide, "lowlevel", None), "_lib", None)
    where = getattr(lib_path, "_name", None)
    return [f"openslide   python {getattr(openslide, '__version__', '?')}, library {lib or '?'}"
            + (f" ({where})" if where else "")]


def s3_lines(environ: dict[str, str] | None = None) -> list[str]:
    """Which credential/endpoint settings exist. Values are never printed."""
    env = os.environ if environ is None else environ
    creds = [v for v in S3_CREDENTIAL_VARS if env.get(v)]
    endpoints = [v for v in S3_ENDPOINT_VARS if env.get(v)]
    files = [p for p in (os.path.expanduser("~/.aws/credentials"), os.path.expanduser("~/.aws/config"))
             if os.path.exists(p)]
    lines = ["S3 credentials " + (f"set via {', '.join(creds)}" if creds else "no AWS_* variables set")
             + (f"; files {', '.join(files)}" if files else "")
             + ("" if creds or files else " (an instance role / IRSA may still provide them)")]
    lines.append("S3 endpoint    " + (f"custom, via {', '.join(endpoints)}" if endpoints else "AWS default"))
    return lines


def cache_lines() -> list[str]:
    from ..slides.cache import ENV_BYTES, ENV_ROOT, SlideCache

    try:
        cache = SlideCache()
    except Exception as exc:  # noqa: BLE001
        return [f"slide cache    unusable: {exc}"]
    used = cache.size_bytes()
    src = "$" + ENV_ROOT if os.environ.get(ENV_ROOT) else "default"
    return [f"slide cache    {cache.root} ({src}): {used / 2**30:.2f} GiB used of {cache.max_bytes / 2**30:.1f} GiB "
            f"budget (${ENV_BYTES}), {len(cache.entries())} slides"]


def report(address: str | None = None, timeout: float = 3.0) -> list[str]:
    from .. import __version__

    sections: list[Callable[[], list[str]]] = [
        lambda: [f"her2ray     {__version__} ({os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})",
                 f"python      {sys.version.split()[0]} ({sys.executable})"],
        torch_lines, lambda: ray_lines(address, timeout), openslide_lines,
        lambda: [f"open_clip   {_dist_version('open_clip_torch')}"], s3_lines, cache_lines,
    ]
    lines: list[str] = []
    for section in sections:
        try:
            lines += section()
        except Exception as exc:  # noqa: BLE001 - one broken probe must not hide the others
            lines.append(f"(probe failed: {type(exc).__name__}: {exc})")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(report(args.address, args.timeout)))
    return 0
