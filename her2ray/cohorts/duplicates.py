"""Is the same slide file in the cohort twice? Content identity without downloading slides twice.

Slides are GBs each and cohorts are thousands of them, so content hashes are computed only where they
can change an answer:

1. ``fs.info()`` of every file (one HEAD per object on S3): size plus the store's own checksum where it
   has one (S3 ``ChecksumSHA256``, GCS ``md5Hash``, an S3 single-part ETag is the MD5; a multipart ETag
   ``"<md5>-<parts>"`` is only equal for equal content *and* equal part sizes).
2. Files of different sizes differ: nothing is read. Same local inode, or equal checksums with equal
   size: the same content, nothing is read.
3. Only inside a same-size group that checksums cannot settle is the SHA-256 streamed, once per file
   (local results are cached per (path, size, mtime) for the life of the process).

``hash_mode="full"`` streams SHA-256 for every file (recorded in the manifest, e.g. for an audit trail);
``"none"`` skips content checks (only identical paths/ids are caught).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import storage

log = logging.getLogger(__name__)

CHUNK = 8 << 20
_LOCAL_SHA256: dict[tuple[str, int, int], str] = {}


@dataclass
class FileInfo:
    """What the store says about one slide file, plus the SHA-256 if it had to be computed."""

    url: str
    exists: bool
    size: int | None = None
    checksum: str | None = None        # "sha256:<hex>", "md5:<hex>", "crc32c:..", "etag:<multipart etag>"
    strong: bool = False               # checksum is a content digest (unequal digests => unequal files)
    local_id: tuple[int, int] | None = None   # (st_dev, st_ino) of a local file
    sha256: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def content_id(self) -> str | None:
        """Best available identity to print in the manifest (SHA-256 when known, else the store's)."""
        return f"sha256:{self.sha256}" if self.sha256 else self.checksum


def _checksum_from_info(info: dict) -> tuple[str | None, bool]:
    """Pick the strongest checksum an fsspec ``info()`` dict offers."""
    for key in ("ChecksumSHA256", "checksum_sha256"):
        if info.get(key):
            return f"sha256-b64:{info[key]}", True
    if info.get("md5Hash"):                       # gcsfs
        return f"md5-b64:{info['md5Hash']}", True
    content_md5 = (info.get("content_settings") or {}).get("content_md5") if isinstance(
        info.get("content_settings"), dict) else None
    if content_md5:                               # adlfs
        return f"md5:{bytes(content_md5).hex() if not isinstance(content_md5, str) else content_md5}", True
    etag = info.get("ETag") or info.get("etag")
    if etag:
        etag = str(etag).strip('"').lower()
        if "-" not in etag and len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
            return f"md5:{etag}", True            # single-part S3 upload: ETag is the MD5
        return f"etag:{etag}", False
    return None, False


def stat_file(url: str) -> FileInfo:
    """One metadata request; never reads the content."""
    try:
        if storage.is_local(url):
            path = os.path.realpath(storage.local_path(url))
            st = os.stat(path)
            return FileInfo(url=url, exists=True, size=st.st_size, local_id=(st.st_dev, st.st_ino),
                            extra={"mtime_ns": st.st_mtime_ns, "realpath": path})
        fs, path = storage.filesystem_for(url)
        info = fs.info(path)
        if info.get("type") == "directory":
            return FileInfo(url=url, exists=False, error="is a directory")
        checksum, strong = _checksum_from_info(info)
        return FileInfo(url=url, exists=True, size=int(info.get("size") or 0), checksum=checksum,
                        strong=strong)
    except FileNotFoundError:
        return FileInfo(url=url, exists=False, error="not found")
    except Exception as exc:  # noqa: BLE001 - permissions, network: reported per file, not fatal here
        return FileInfo(url=url, exists=False, error=f"{type(exc).__name__}: {exc}")


def stat_files(urls: list[str], max_workers: int = 16) -> dict[str, FileInfo]:
    """``stat_file`` for each distinct URL, concurrently (metadata calls are latency-bound)."""
    unique = list(dict.fromkeys(urls))
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(unique) or 1))) as pool:
        return dict(zip(unique, pool.map(stat_file, unique)))


def sha256_of(info: FileInfo) -> str:
    """Stream the file once through SHA-256 (local results cached per path/size/mtime)."""
    if info.sha256:
        return info.sha256
    key = None
    if info.local_id is not None:
        key = (info.extra["realpath"], info.size or 0, info.extra["mtime_ns"])
        if key in _LOCAL_SHA256:
            info.sha256 = _LOCAL_SHA256[key]
            return info.sha256
    h = hashlib.sha256()
    fs, path = storage.filesystem_for(info.url)
    with fs.open(path, "rb", block_size=CHUNK) as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    info.sha256 = h.hexdigest()
    if key is not None:
        _LOCAL_SHA256[key] = info.sha256
    log.debug("sha256 %s = %s", info.url, info.sha256)
    return info.sha256


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def content_groups(infos: dict[str, FileInfo], hash_mode: str = "auto",
                   max_workers: int = 4) -> dict[str, str]:
    """Map each existing URL to a group id; URLs with the same group id hold the same bytes.

    Group ids are the representative URL of the group. See the module docstring for what is read.
    """
    urls = [u for u, i in infos.items() if i.exists]
    uf = _UnionFind(urls)
    if hash_mode == "none":
        return {u: uf.find(u) for u in urls}
    if hash_mode == "full":
        _hash_all([infos[u] for u in urls], max_workers)
    by_size: dict[int, list[str]] = {}
    for u in urls:
        by_size.setdefault(int(infos[u].size or 0), []).append(u)
    for group in by_size.values():
        if len(group) < 2:
            continue
        # cheap evidence of sameness: one inode, or equal checksums (with equal size)
        seen: dict[object, str] = {}
        for u in group:
            i = infos[u]
            for key in (("ino", i.local_id) if i.local_id else None,
                        ("sum", i.checksum) if i.checksum else None,
                        ("sha", i.sha256) if i.sha256 else None):
                if key is None:
                    continue
                if key in seen:
                    uf.union(seen[key], u)
                else:
                    seen[key] = u
        reps = list(dict.fromkeys(uf.find(u) for u in group))
        if len(reps) < 2:
            continue
        if all(infos[r].strong for r in reps) and len({infos[r].checksum.split(":")[0] for r in reps}) == 1:
            continue  # distinct content digests of one kind: provably different files
        _hash_all([infos[r] for r in reps], max_workers)
        by_sha: dict[str, str] = {}
        for r in reps:
            sha = infos[r].sha256
            if sha in by_sha:
                uf.union(by_sha[sha], r)
            else:
                by_sha[sha] = r
    return {u: uf.find(u) for u in urls}


def _hash_all(infos: list[FileInfo], max_workers: int) -> None:
    todo = [i for i in infos if not i.sha256]
    if not todo:
        return
    log.info("hashing %d slide file(s) whose size and checksum could not tell them apart", len(todo))
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo)))) as pool:
        list(pool.map(sha256_of, todo))
