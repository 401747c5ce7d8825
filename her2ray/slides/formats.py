"""Which files make up one slide: single files, DICOM series folders and multi-file vendor formats.

Why: OpenSlide opens a slide from one file name, but several formats spread a slide over many files that
must sit side by side: a DICOM WSI is a folder of ``.dcm`` instances (one per level / associated image),
MIRAX is ``x.mrxs`` plus a data folder ``x/``, Hamamatsu VMS/VMU is an index file plus the image files it
names. ``slide_files`` answers, for a local folder or any fsspec location, "which files belong to this
slide, and which one is handed to the reader"; the staging cache downloads exactly that set, and local
folders are resolved to the file OpenSlide wants. Pure listing: no pixels are read here.
"""

from __future__ import annotations

import configparser
import posixpath
from dataclasses import dataclass

from ..errors import SlideNotFoundError, SlideReadError

DICOM_SUFFIX = ".dcm"
MIRAX_SUFFIX = ".mrxs"
HAMAMATSU_INDEX_SUFFIXES = (".vms", ".vmu")
#: index files that name the slide inside a folder, in the order they are looked for
INDEX_SUFFIXES = (MIRAX_SUFFIX, *HAMAMATSU_INDEX_SUFFIXES)


@dataclass(frozen=True)
class SlideFile:
    #: path relative to ``SlideFileSet.root`` ('/'-separated)
    name: str
    size: int
    #: ETag / mtime / generation when the store gives one ('' otherwise): part of the cache key
    version: str = ""


@dataclass(frozen=True)
class SlideFileSet:
    """The files of one slide under ``root``; ``open_name`` is the one given to the slide reader."""

    root: str
    open_name: str
    files: tuple[SlideFile, ...]
    #: False for a plain single-file slide (staged as one file), True for a series / companion set
    multi_file: bool

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _version(info: dict) -> str:
    return next((str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "last_modified",
                                        "created", "generation") if info.get(k) is not None), "")


def _listing(fs, folder: str, recursive: bool = False) -> dict[str, dict]:
    """{relative name: info} of the regular files in ``folder`` (optionally below it)."""
    folder = folder.rstrip("/")
    if recursive:
        found = fs.find(folder, detail=True)
    else:
        found = {i["name"]: i for i in fs.ls(folder, detail=True)}
    out = {}
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = posixpath.relpath(str(name).rstrip("/"), folder)
        if not rel.startswith("..") and not posixpath.basename(rel).startswith("."):
            out[rel] = info
    return out


def _file(rel: str, info: dict) -> SlideFile:
    return SlideFile(rel, int(info.get("size") or 0), _version(info))


def _vms_companions(fs, path: str, siblings: dict[str, dict]) -> list[str]:
    """Sibling files a Hamamatsu .vms/.vmu index names (ImageFile, MapFile, OptimisationFile, ...)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(fs.cat_file(path).decode("utf-8", errors="replace"))
    except (configparser.Error, UnicodeError) as exc:
        raise SlideReadError(path, f"cannot parse the Hamamatsu index file: {exc}") from None
    named = {v.strip() for s in parser.sections() for v in parser[s].values()}
    return sorted(n for n in named if n in siblings)


def slide_files(fs, path: str) -> SlideFileSet:
    """The file set of the slide at ``path`` on ``fs`` (a local or remote fsspec filesystem).

    * a folder: a MIRAX / VMS / VMU index inside it names the slide; otherwise it is a DICOM series
      folder (every file in it is staged; the largest ``.dcm`` instance, level 0, is opened; a folder
      without ``.dcm`` files is refused);
    * ``x.mrxs``: the index plus every file under the data folder ``x/``;
    * ``x.vms`` / ``x.vmu``: the index plus the sibling files it names;
    * ``x.dcm``: every ``.dcm`` file of its folder (OpenSlide gathers the series from the folder);
    * anything else: the file alone.
    """
    path = str(path).rstrip("/")
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SlideNotFoundError(path, "slide not found") from None
    lower = path.lower()
    if info.get("type") == "directory":
        return _folder_set(fs, path)
    parent, base = posixpath.split(path)
    if lower.endswith(MIRAX_SUFFIX):
        data_dir = posixpath.join(parent, base[: -len(MIRAX_SUFFIX)])
        data = _listing(fs, data_dir, recursive=True) if fs.isdir(data_dir) else {}
        if not data:
            raise SlideReadError(path, f"MIRAX slide without its data folder {data_dir}/ (a .mrxs file "
                                       "needs the folder of the same name beside it)")
        stem = posixpath.basename(data_dir)
        files = [_file(base, info)] + [_file(f"{stem}/{rel}", i) for rel, i in sorted(data.items())]
        return SlideFileSet(parent, base, tuple(files), True)
    if lower.endswith(HAMAMATSU_INDEX_SUFFIXES):
        siblings = _listing(fs, parent)
        files = [_file(base, info)] + [_file(n, siblings[n]) for n in _vms_companions(fs, path, siblings)]
        return SlideFileSet(parent, base, tuple(files), len(files) > 1)
    if lower.endswith(DICOM_SUFFIX):
        siblings = _listing(fs, parent)
        files = [_file(n, i) for n, i in sorted(siblings.items()) if n.lower().endswith(DICOM_SUFFIX)]
        return SlideFileSet(parent, base, tuple(files), len(files) > 1)
    return SlideFileSet(parent, base, (_file(base, info),), False)


def _folder_set(fs, folder: str) -> SlideFileSet:
    listing = _listing(fs, folder)
    if not listing:
        raise SlideReadError(folder, "slide folder is empty (expected a DICOM series, or a MIRAX/VMS/VMU "
                                     "index file with its companions)")
    for suffix in INDEX_SUFFIXES:
        index = sorted(n for n in listing if n.lower().endswith(suffix))
        if len(index) > 1:
            raise SlideReadError(folder, f"slide folder holds several {suffix} slides {index}: "
                                         "name the index file in the manifest instead")
        if index:
            inner = slide_files(fs, posixpath.join(folder, index[0]))
            return SlideFileSet(folder, inner.open_name, inner.files, True)
    dicom = {n: i for n, i in listing.items() if n.lower().endswith(DICOM_SUFFIX)}
    if not dicom:
        raise SlideReadError(folder, "slide folder holds no .dcm files and no MIRAX/VMS/VMU index file "
                                     f"(found e.g. {sorted(listing)[:3]})")
    # Level 0 is the largest instance; ties broken by name so the choice never depends on listing order.
    open_name = max(sorted(dicom), key=lambda n: int(dicom[n].get("size") or 0))
    files = tuple(_file(n, i) for n, i in sorted(listing.items()))
    return SlideFileSet(folder, open_name, files, True)


def is_slide_folder(url: str, storage_options=None) -> bool:
    """True when the folder at ``url`` (local or remote) holds one slide: a DICOM series or a MIRAX/VMS/VMU
    index with its companions (for preflight checks that otherwise accept only regular files)."""
    from .. import storage

    try:
        fs, path = storage.filesystem_for(url, storage_options)
        return fs.isdir(path) and bool(slide_files(fs, path).files)
    except (SlideNotFoundError, SlideReadError, OSError):
        return False


def local_open_path(path: str) -> str:
    """The file a slide reader opens for a local slide ``path`` (a file, or a slide folder)."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    if not os.path.isdir(path):
        return path
    found = slide_files(LocalFileSystem(), os.path.abspath(path))
    return os.path.join(path, found.open_name)
