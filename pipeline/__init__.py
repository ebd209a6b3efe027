"""Everything that makes data: the data contract (`data/`), the stages (`stages/`), the LLM layer (`llm/`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpr")  # the distribution's version, recorded in every manifest
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
