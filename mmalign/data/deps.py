"""Optional packages of the data layer, imported with an error that says which extra installs them.

| package | extra | needed for |
|---|---|---|
| `pyarrow` | `mmalign[parquet]` | parquet inputs (`pickapic`, `trl` parquet files) |
| `av` (PyAV) | `mmalign[video]` | decoding videos (`read_frames`, `video_info`, validating `video_pair` sets) |
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"pyarrow": "parquet", "av": "video"}


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message names the pip command that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. `"pyarrow.parquet"`), or raise MissingDependencyError saying what needs it and how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        extra = EXTRAS.get(package)
        how = f"pip install 'mmalign[{extra}]'" if extra else f"pip install {package}"
        raise MissingDependencyError(f"{purpose} needs the optional package {package!r}, which is not installed "
                                     f"({err}); install it with: {how}") from err
