"""Slide reading: the OpenSlide backend on the real SVS and on synthetic pyramids, MPP rules, typed
errors, and staging of remote slides (real moto S3 server, fsspec memory and a failing filesystem)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import numpy as np
import openslide
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from her2ray.errors import MissingMPPError, SlideNotFoundError, SlideReadError
from her2ray.slides import SlideCache, available_backends, open_slide, register_backend
from her2ray.slides.base import composite_on_white
from her2ray.slides.mpp import mpp_from_properties
from her2ray.synth import write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory) -> Path:
    """Synthetic 1536 x 1280 px slide at 0.25 um/px with levels 1, 2, 4, 8, ..."""
    path = tmp_path_factory.mktemp("slides") / "pyr.tiff"
    return Path(write_synthetic_slide(path, 1536, 1280, mpp=0.25, seed=3))


@pytest.fixture(scope="module")
def no_mpp_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "nompp.tiff"
    return Path(write_synthetic_slide(path, 768, 768, mpp=0.5, seed=4, write_mpp=False))


# ---- real slide -------------------------------------------------------------------------------------

def test_real_svs_metadata_and_region(cmu_small_region):
    with open_slide(cmu_small_region) as s:
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1 and s.level_downsamples == (1.0,)
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "slide"
        assert s.properties["openslide.vendor"] == "aperio"
        region = s.read_region(1024, 768, 0, 300, 200)
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        direct = np.asarray(openslide.OpenSlide(str(cmu_small_region)).read_region((1024, 768), 0, (300, 200)))
        assert np.array_equal(region, direct[..., :3])
        thumb = s.thumbnail(512)
        assert max(thumb.shape[:2]) == 512 and thumb.shape[2] == 3
    assert s.closed


def test_region_outside_slide_is_white(cmu_small_region):
    with open_slide(cmu_small_region) as s:
        region = s.read_region(2220 - 10, 0, 0, 40, 8)  # 30 px beyond the right edge
    assert (region[:, 10:] == 255).all()
    assert not (region[:, :10] == 255).all()


def test_composite_on_white():
    rgba = np.array([[[100, 50, 0, 255], [100, 50, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = composite_on_white(rgba)
    assert out[0, 0].tolist() == [100, 50, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_mpp_override_wins(cmu_small_region):
    with open_slide(cmu_small_region, mpp_override=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
        assert s.native_mpp == pytest.approx(0.499)
    with pytest.raises(SlideReadError, match="override"):
        open_slide(cmu_small_region, mpp_override=-1)


def test_mpp_from_properties_rules():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}) == 0.25
    cm = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}
    assert mpp_from_properties(cm) == pytest.approx(0.25)
    inch = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "50800", "tiff.YResolution": "50800"}
    assert mpp_from_properties(inch) == pytest.approx(0.5)
    assert mpp_from_properties({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72"}) is None  # 352 um/px
    assert mpp_from_properties({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}) is None
    assert mpp_from_properties({}) is None


# ---- synthetic pyramids and errors ------------------------------------------------------------------

def test_synthetic_pyramid_levels(pyramid_slide):
    with open_slide(pyramid_slide) as s:
        assert s.level_count >= 3
        assert s.level_downsamples[:3] == (1.0, 2.0, 4.0)
        assert s.mpp == pytest.approx(0.25)
        assert s.level_mpp(1) == pytest.approx(0.5)
        assert s.read_region(512, 512, 1, 64, 32).shape == (32, 64, 3)


def test_missing_mpp_error_names_file_and_fix(no_mpp_slide):
    with open_slide(no_mpp_slide) as s:
        with pytest.raises(MissingMPPError) as info:
            _ = s.mpp
        assert s.mpp_source == "missing"
    msg = str(info.value)
    assert str(no_mpp_slide) in msg and "mpp" in msg and "--mpp-override" in msg
    with open_slide(no_mpp_slide, mpp_override=0.5) as s:
        assert s.mpp == 0.5


def test_missing_file(tmp_path):
    with pytest.raises(SlideNotFoundError, match="nope.svs"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic handlers
        open_slide(f"file://{tmp_path}/nope.svs")


def test_unsupported_and_corrupt_files(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(SlideReadError, match="notes.svs"):
        open_slide(text)
    junk = tmp_path / "junk.tiff"
    junk.write_bytes(b"II*\x00" + os.urandom(4096))  # TIFF magic, garbage after it
    with pytest.raises(SlideReadError, match="junk.tiff"):
        open_slide(junk)


def test_truncated_file_raises_typed_error(pyramid_slide, tmp_path):
    data = pyramid_slide.read_bytes()
    cut = tmp_path / "truncated.tiff"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match="truncated.tiff"):
        with open_slide(cut) as s:  # may open (header intact) and fail on the missing tiles
            w, h = s.dimensions
            s.read_region(0, 0, 0, w, h)


def test_file_url(pyramid_slide):
    with open_slide(f"file://{pyramid_slide}") as s:
        assert s.local_path == str(pyramid_slide)
        assert s.dimensions == (1536, 1280)


def test_backend_registry(pyramid_slide):
    from her2ray.slides.openslide_backend import OpenSlideReader

    assert "openslide" in available_backends()
    with pytest.raises(ValueError, match="already registered"):
        register_backend("openslide", OpenSlideReader)
    register_backend("openslide-alias", OpenSlideReader, replace=True)
    with open_slide(pyramid_slide, backend="openslide-alias") as s:
        assert s.dimensions == (1536, 1280)
    with pytest.raises(ValueError, match="unknown slide backend"):
        open_slide(pyramid_slide, backend="nope")


# ---- remote slides and the cache --------------------------------------------------------------------

def test_s3_slide_is_staged_and_matches_local(s3_bucket, pyramid_slide, tmp_path):
    fs = fsspec.filesystem("s3")
    url = f"{s3_bucket}/cohort/pyr.tiff"
    fs.put_file(str(pyramid_slide), url)
    cache = SlideCache(tmp_path / "cache", max_bytes=50 * 1024**2)
    with open_slide(pyramid_slide) as local, open_slide(url, cache=cache) as remote:
        assert remote.path == url
        assert remote.local_path.startswith(cache.root) and os.path.exists(remote.local_path)
        assert remote.dimensions == local.dimensions and remote.mpp == local.mpp
        assert np.array_equal(remote.read_region(256, 256, 0, 300, 200), local.read_region(256, 256, 0, 300, 200))
        assert cache.clear() == 0  # in use: not evicted
    assert len(cache.entries()) == 1
    with open_slide(url, cache=cache) as again:  # second open reuses the staged copy
        assert again.local_path == cache.entries()[0].path
    assert cache.clear() == 1 and cache.entries() == []
    with pytest.raises(SlideNotFoundError, match="missing.tiff"):
        open_slide(f"{s3_bucket}/missing.tiff", cache=cache)


def _memory_file(name: str, size: int) -> str:
    MemoryFileSystem().pipe_file(f"/her2ray-test/{name}", bytes([len(name) % 251]) * size)
    return f"memory://her2ray-test/{name}"


def test_cache_lru_eviction_under_budget(tmp_path):
    cache = SlideCache(tmp_path / "c", max_bytes=2500)
    a, b, c = (_memory_file(f"{n}-{time.time_ns()}", 1000) for n in "abc")
    for url in (a, b):
        cache.stage(url).release()
        time.sleep(0.02)
    cache.stage(a).release()  # a is now more recently used than b
    time.sleep(0.02)
    cache.stage(c).release()
    kept = {os.path.basename(e.path).split("-", 1)[1] for e in cache.entries()}
    assert kept == {os.path.basename(a), os.path.basename(c)}
    assert cache.size_bytes() <= 2500


def test_cache_keeps_slides_in_use_and_refuses_oversize(tmp_path):
    cache = SlideCache(tmp_path / "c", max_bytes=1500)
    a, b = _memory_file(f"a-{time.time_ns()}", 1000), _memory_file(f"b-{time.time_ns()}", 1000)
    lease = cache.stage(a)
    with cache.stage(b) as lease_b:  # over budget, but a is pinned: kept, not deleted under the reader
        assert os.path.exists(lease.local_path) and os.path.exists(lease_b.local_path)
    lease.release()
    c = _memory_file(f"c-{time.time_ns()}", 1000)
    cache.stage(c).release()  # nothing pinned any more: a and b go to make room for c
    assert [os.path.basename(e.path).split("-", 1)[1] for e in cache.entries()] == [os.path.basename(c)]
    with pytest.raises(SlideReadError, match="budget"):
        cache.stage(_memory_file(f"big-{time.time_ns()}", 2000))


class _FlakyFS(MemoryFileSystem):
    """A real in-memory filesystem whose reads fail half-way (a dropped connection)."""

    protocol = "flaky"

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).replace("flaky://", "", 1))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        size = len(f.getvalue())
        original = f.read

        def read(n=-1):
            if f.tell() >= size // 2:
                raise ConnectionError("connection reset")
            return original(min(n if n and n > 0 else size, size // 2 - f.tell()))

        f.read = read
        return f


def test_failed_download_leaves_no_partial_file(tmp_path):
    fsspec.register_implementation("flaky", _FlakyFS, clobber=True)
    _FlakyFS().pipe_file("/her2ray-test/flaky.tiff", b"x" * 100_000)
    cache = SlideCache(tmp_path / "c", max_bytes=10**6)
    with pytest.raises(SlideReadError, match="download failed"):
        cache.stage("flaky://her2ray-test/flaky.tiff")
    assert cache.entries() == []
    assert os.listdir(cache.tmp_dir) == []


_STAGE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from her2ray.slides import SlideCache
    cache = SlideCache(sys.argv[1], max_bytes=10**9)
    with cache.stage(sys.argv[2]) as lease:
        st = os.stat(lease.local_path)
        print(json.dumps({"path": lease.local_path, "size": st.st_size, "inode": st.st_ino}))
""")


def test_concurrent_processes_share_one_download(s3_bucket, pyramid_slide, tmp_path):
    url = f"{s3_bucket}/shared/pyr.tiff"
    fsspec.filesystem("s3").put_file(str(pyramid_slide), url)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _STAGE_SCRIPT, str(tmp_path / "cache"), url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["path"] for r in results}) == 1
    assert len({r["inode"] for r in results}) == 1  # downloaded once, never replaced under a reader
    assert results[0]["size"] == pyramid_slide.stat().st_size
    assert Path(results[0]["path"]).read_bytes() == pyramid_slide.read_bytes()
    assert os.listdir(tmp_path / "cache" / "tmp") == []


# ---- direct JPEG tile decoding (fast path) ---------------------------------------------------------------

def test_fast_tiff_path_is_pixel_identical_to_openslide(pyramid_slide, cmu_small_region, monkeypatch):
    regions = [(0, 0, 0, 256, 256), (300, 200, 0, 517, 263), (1400, 1200, 0, 300, 200),  # crosses the edge
               (512, 256, 1, 300, 300), (0, 0, 2, 384, 320), (-64, -32, 0, 128, 96)]
    monkeypatch.setenv("HER2RAY_FAST_TIFF", "0")
    with open_slide(pyramid_slide) as slow:
        assert slow._fast is None
        expected = [slow.read_region(*r) for r in regions]
    monkeypatch.setenv("HER2RAY_FAST_TIFF", "1")
    with open_slide(pyramid_slide) as fast:
        assert fast._fast is not None and all(fast._fast.supports(k) for k in range(fast.level_count))
        for r, ref in zip(regions, expected):
            assert np.array_equal(fast.read_region(*r), ref), r
    with open_slide(cmu_small_region) as s:  # Aperio: 240 px tiles, unaligned reads
        assert s._fast is not None
        direct = openslide.OpenSlide(str(cmu_small_region))
        for x, y in [(0, 0), (1000, 1000), (2000, 2800)]:
            ref = np.asarray(direct.read_region((x, y), 0, (256, 256)))
            assert np.array_equal(s.read_region(x, y, 0, 256, 256), composite_on_white(ref))
