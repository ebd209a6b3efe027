"""mpr: dense supervision for retrieval training from sparse labels and an LLM."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
