"""mpr: dense supervision for retrieval training from sparse labels and an LLM."""

from __future__ import annotations

from pipeline import __version__

__all__ = ["__version__"]
