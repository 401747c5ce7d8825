"""Typed errors: bad input is reported at the boundary with the file, row and column it came from."""

from __future__ import annotations


class Her2RayError(Exception):
    """Base class of every error her2ray raises on purpose."""

    #: exit status of the ``her2ray`` command when this error ends it (see "Exit codes" in the README)
    exit_code = 2


class RayStartError(Her2RayError):
    """Ray could not be started locally or reached at the given address (nothing was run)."""

    exit_code = 3


class StoreBusyError(Her2RayError):
    """Another live run holds the store's lease (see ``her2ray.features.lease``)."""

    exit_code = 4


class ConfigError(Her2RayError, ValueError):
    """A configuration (YAML, flags, dict) is invalid: unknown key, wrong type, bad value."""


class ManifestError(Her2RayError, ValueError):
    """A manifest or table failed validation; the message names the file, row and column."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        self.file, self.row, self.column = file, row, column
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class SlideError(Her2RayError):
    """A slide could not be used; always names the slide file."""

    def __init__(self, path: str, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist (locally or on the object store)."""


class SlideReadError(SlideError):
    """The file exists but cannot be decoded: truncated, corrupt or an unsupported format."""


class MissingMPPError(SlideError):
    """The slide carries no microns-per-pixel and no override was given."""


class NoTissueError(SlideError):
    """Tissue segmentation found no tile above the tissue threshold."""


class FeatureStoreError(Her2RayError):
    """A feature file or slide catalog is missing, inconsistent or made with other settings."""


class SlideTooLargeError(SlideReadError):
    """The slide's level 0 is too large to process (e.g. an unpyramided scan); the message names its size."""
