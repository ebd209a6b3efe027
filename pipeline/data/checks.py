"""Cheap checks of a command's paths and model names, run before any heavy import or any output.

Each raises an MprError naming the option, the path and what is wrong, so a bad path fails in well
under a second instead of after torch is imported or a folder is created.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

from pipeline.errors import MprError

WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def out_folder(path: Path, option: str = "--out") -> None:
    """An output folder: absent, or a folder; its nearest existing parent is a folder."""
    if path.exists() and not path.is_dir():
        raise MprError(f"{option} {path}: exists and is a file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise MprError(f"{option} {path}: {base} is a file, not a folder")


def out_file(path: Path | None, option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise MprError(f"{option} {path}: is a folder, not a file")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise MprError(f"{option} {path}: {base} is a file, not a folder")


def in_file(path: Path, option: str) -> None:
    if not path.exists():
        raise MprError(f"{option} {path}: no such file")
    if path.is_dir():
        raise MprError(f"{option} {path}: is a folder, not a file")
    if path.stat().st_size == 0:
        raise MprError(f"{option} {path}: empty file (0 bytes)")


def in_folder(path: Path, option: str, what: str = "folder") -> None:
    if not path.exists():
        raise MprError(f"{option} {path}: no such {what}")
    if not path.is_dir():
        raise MprError(f"{option} {path}: is a file, not a {what}")


def shard_folder(path: Path, option: str) -> None:
    in_folder(path, option, "shard folder")
    if not any(path.glob("part-*.parquet")):
        raise MprError(f"{option} {path}: no part-*.parquet files (is this an mpr shard folder?)")


def distinct(source: Path, out: Path, option: str = "--in") -> None:
    if source.resolve() == out.resolve():
        raise MprError(f"--out {out}: is the input folder ({option}); choose another --out")


def train_inputs(
    data: list[Path], out: Path, model_name: str, eval_data: Path | None, eval_split: str
) -> None:
    """What `mpr train` reads and writes, checked before torch is imported."""
    for folder in data:
        shard_folder(folder, "--data")
        distinct(folder, out, "--data")
    out_folder(out)
    model(model_name)
    if eval_data is not None:
        beir_folder(eval_data, eval_split, "--eval-data")


def beir_folder(root: Path, split: str | None, option: str = "--data") -> None:
    """The files of a BEIR folder are there, are files and are not empty; `split` (unless None) exists."""
    from pipeline.data.readers import find_path, split_names

    in_folder(root, option, "data folder")
    for name in ("corpus.jsonl", "queries.jsonl"):
        found = find_path(root, name)
        if found is None:
            raise MprError(
                f"{root / name}: missing file "
                "(a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv)"
            )
        in_file(found, option)
    if split is not None and split != "all":
        found = find_path(root / "qrels", f"{split}.tsv")
        if found is None:
            available = ", ".join(split_names(root)) or "none"
            raise MprError(
                f"{root / 'qrels' / f'{split}.tsv'}: split '{split}' does not exist (available: {available})"
            )
        in_file(found, option)


def looks_local(name: str) -> bool:
    """A model name is a local path when it exists, is shaped like a path, or starts with an existing
    folder."""
    path = Path(name).expanduser()
    if path.exists() or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def model(name: str, option: str = "--model") -> None:
    """A local model folder must exist and hold a complete model; a hub id must be cached when offline."""
    if not looks_local(name):
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {
            "1",
            "true",
            "yes",
            "on",
        } and not _hub_cached(name):
            raise MprError(
                f"{option} {name}: no such local folder, "
                "and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
            )
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise MprError(f"{option} {name}: no such folder")
    if not path.is_dir():
        raise MprError(f"{option} {name}: is a file, not a model folder")
    problem = _incomplete(path)
    if problem:
        raise MprError(f"{option} {name}: not a complete model folder ({problem})")


def _hub_cached(name: str) -> bool:
    from pipeline.data.locations import DEFAULT_ENCODER, in_hf_cache

    if name == DEFAULT_ENCODER:  # resolved to the bundled copy when not cached
        return True
    return in_hf_cache(name)


def _incomplete(folder: Path) -> str | None:
    """What a sentence-transformers / transformers model folder lacks, or None: some folder among it and
    its modules must hold a config.json and non-empty weights."""
    roots = [folder]
    modules = folder / "modules.json"
    if modules.exists():
        try:
            entries = [
                (str(m["path"]), str(m.get("type", "")))
                for m in json.loads(modules.read_text(encoding="utf-8"))
            ]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return f"modules.json is not valid: {str(exc).splitlines()[0]}"
        for sub, kind in entries:
            # Normalize has nothing to save: sentence-transformers writes no folder for it
            if sub and not (folder / sub).is_dir() and not kind.endswith("Normalize"):
                return f"module folder '{sub}' listed in modules.json is missing"
        roots += [folder / sub for sub, _ in entries if sub and (folder / sub).is_dir()]
    for root in roots:
        weights = [root / w for w in WEIGHTS if (root / w).exists()]
        if not weights or not (root / "config.json").exists():
            continue
        try:
            json.loads((root / "config.json").read_text(encoding="utf-8"))
        except ValueError:
            return f"{(root / 'config.json').relative_to(folder)} is not valid JSON"
        empty = [w for w in weights if w.stat().st_size == 0]
        if empty:
            return f"{empty[0].relative_to(folder)} is empty"
        for w in weights:
            problem = weights_problem(w)
            if problem:
                return f"{w.relative_to(folder)} {problem}"
        return None
    return "no config.json with model weights (model.safetensors or pytorch_model.bin)"


def weights_problem(path: Path) -> str | None:
    """Why a weights file cannot be loaded (cut short, or not the format its name says), or None. Reads the
    safetensors header (8-byte length, JSON with every tensor's byte range) or the zip directory of a
    PyTorch `.bin`, never the tensors."""
    size = path.stat().st_size
    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return f"is truncated ({size} bytes)"
                length = int.from_bytes(head, "little")
                if length > size - 8:
                    return f"is truncated ({size:,} bytes, its header alone says {length + 8:,})"
                header = json.loads(fh.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
            expected = 8 + length + max(ends, default=0)
            if size != expected:
                how = "truncated" if size < expected else "longer than its header says"
                return f"is {how} ({size:,} bytes, expected {expected:,})"
        elif path.suffix in (".bin", ".pt", ".pth"):
            with path.open("rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's format; older files are plain pickles
            if zipped:
                with zipfile.ZipFile(path):  # reads the zip directory, which a file cut short lacks
                    pass
            elif size < 1024:
                return f"is not a PyTorch file ({size} bytes)"
    except zipfile.BadZipFile as exc:
        return f"is truncated or corrupt ({size:,} bytes: {exc})"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"is corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None
