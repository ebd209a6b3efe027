"""Readers for the input formats: BEIR layout and Tevatron/RLHN-style rows.

Every problem is reported as one line naming the file, the line and what is wrong.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pipeline.data.labels import encoder_text
from pipeline.errors import InputError, MprError

ENCODING = "utf-8"  # of every text input unless --encoding says otherwise; a UTF-8 byte-order mark is skipped
_encoding = ENCODING


def use_encoding(encoding: str | None) -> None:
    """Read text inputs in `encoding` (None: UTF-8) for the rest of this process (`--encoding`)."""
    global _encoding
    name = encoding or ENCODING
    try:
        codecs.lookup(name)
    except LookupError:
        raise MprError(f"--encoding {name}: unknown encoding") from None
    _encoding = name


def find_path(folder: Path, name: str) -> Path | None:
    """`name` or `name.gz` inside `folder`, whatever it is (a folder of that name is reported by the
    reader)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def find_file(folder: Path, name: str) -> Path | None:
    """`name` or `name.gz` inside `folder`."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def require_file(folder: Path, name: str) -> Path:
    """`name` or `name.gz` inside `folder`; an InputError when neither is there."""
    path = find_file(folder, name)
    if path is None:
        raise InputError(folder / name, "no such file (nor .gz)")
    return path


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")


def _binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _decode_problem(path: Path, exc: UnicodeDecodeError, lineno: int | None, raw: bytes = b"") -> InputError:
    if lineno == 1 and raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        hint = "the file is UTF-16; convert it to UTF-8 or pass --encoding utf-16"
    else:
        hint = "convert the file to UTF-8 or pass --encoding (e.g. --encoding latin-1)"
    where = f" at column {exc.start + 1}" if lineno is not None else ""
    return InputError(
        path, f"not valid {exc.encoding} (byte 0x{exc.object[exc.start]:02x}{where}); {hint}", lineno
    )


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a text file (.gz read transparently), without the newline.

    A line that does not decode, a truncated or broken gzip stream, a folder and a zero-byte file are
    InputErrors naming the file (and the line)."""
    _check_readable(path)
    encoding = _encoding
    lineno = 0
    try:
        with _binary(path) as fh:
            if "\n".encode(encoding) != b"\n":  # UTF-16/32: lines are not split at the byte 0x0a
                text = io.TextIOWrapper(fh, encoding=encoding, newline=None)
                for lineno, line in enumerate(text, start=1):
                    yield lineno, line.rstrip("\r\n")
                return
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as exc:
                    raise _decode_problem(path, exc, lineno, raw) from None
                yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise _decode_problem(path, exc, None) from None
    except EOFError:
        raise InputError(
            path, f"truncated gzip file (it ends after line {lineno}); download or compress it again"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(path, f"not a valid gzip file ({exc})") from None


def open_text(path: Path) -> io.TextIOBase:
    """The file as text lines (as `iter_lines` reads it, each ending in a newline)."""
    return _Lines(path)


class _Lines(io.TextIOBase):
    def __init__(self, path: Path):
        self._lines = iter_lines(path)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return (line + "\n" for _, line in self._lines)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a malformed line is an InputError."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"malformed JSON ({exc.msg} at column {exc.colno})", lineno) from None
        except RecursionError:
            raise InputError(path, "malformed JSON (nested too deeply)", lineno) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
        yield lineno, obj


def _str_field(path: Path, lineno: int, obj: dict[str, Any], key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise InputError(path, f"missing field '{key}'", lineno)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InputError(path, f"field '{key}' must be a string, got {type(value).__name__}", lineno)
    return value


# What a reader does with an empty or blank document or query: leave it out and count it (real collections
# hold a few), or stop with an error naming its line.
OnEmpty = Literal["skip", "error"]


@dataclass
class Corpus:
    """Passages in file order, with an id -> position index; `empty`: ids of blank documents left out."""

    ids: list[str] = field(default_factory=list)
    titles: list[str | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, pid: str, title: str | None, text: str) -> None:
        self.index[pid] = len(self.ids)
        self.ids.append(pid)
        self.titles.append(title)
        self.texts.append(text)

    def full_text(self, i: int) -> str:
        """Passage `i` as the encoders see it (`pipeline.data.labels.encoder_text`)."""
        return encoder_text(self.titles[i], self.texts[i])


def read_corpus(path: Path, *, on_empty: OnEmpty = "skip") -> Corpus:
    corpus = Corpus()
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        pid = _str_field(path, lineno, obj, "_id")
        title = _str_field(path, lineno, obj, "title", required=False).strip() or None
        text = _str_field(path, lineno, obj, "text", required=False)
        if pid in first_line:
            raise InputError(path, f"duplicate _id '{pid}' (first seen on line {first_line[pid]})", lineno)
        first_line[pid] = lineno
        if not text.strip() and not title:
            if on_empty == "error":
                raise InputError(path, f"document '{pid}' has an empty title and text", lineno)
            corpus.empty.append(pid)
            continue
        corpus.add(pid, title, text)
    if not corpus.ids:
        raise InputError(path, "no documents")
    return corpus


def read_queries(path: Path, *, on_empty: OnEmpty = "skip", empty: list[str] | None = None) -> dict[str, str]:
    """{qid: text}; the ids of blank queries left out are appended to `empty`."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        qid = _str_field(path, lineno, obj, "_id")
        text = _str_field(path, lineno, obj, "text")
        if qid in first_line:
            raise InputError(path, f"duplicate _id '{qid}' (first seen on line {first_line[qid]})", lineno)
        first_line[qid] = lineno
        if not text.strip():
            if on_empty == "error":
                raise InputError(path, f"query '{qid}' has an empty text", lineno)
            if empty is not None:
                empty.append(qid)
            continue
        queries[qid] = text
    return queries


def read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """qrels[qid][pid] = score, plus the line of each pair (for error messages downstream)."""
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    for lineno, line in iter_lines(path):
        try:
            row = next(csv.reader([line], delimiter="\t"), [])
        except csv.Error as exc:
            raise InputError(path, f"not a TSV line ({exc})", lineno) from None
        if not row or not "".join(row).strip():
            continue
        if lineno == 1 and row[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue
        if len(row) == 4:  # TREC qrels: qid iteration docid relevance
            row = [row[0], row[2], row[3]]
        if len(row) != 3:
            raise InputError(
                path, f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(row)}", lineno
            )
        qid, pid, raw = (x.strip() for x in row)
        try:
            score = int(float(raw))
        except (ValueError, OverflowError):
            raise InputError(path, f"score '{raw}' is not a number", lineno) from None
        if pid in qrels.get(qid, {}):
            raise InputError(
                path,
                f"duplicate judgment for query '{qid}', document '{pid}' (first on line {lines[(qid, pid)]})",
                lineno,
            )
        qrels.setdefault(qid, {})[pid] = score
        lines[(qid, pid)] = lineno
    return qrels, lines


@dataclass
class BeirDataset:
    root: Path
    split: str
    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    files: dict[str, Path]
    dropped_qrels: int = 0
    empty_documents: int = 0
    empty_queries: int = 0
    qrels_of_empty: int = 0  # judgments dropped because their document or query is empty


def split_names(root: Path) -> list[str]:
    folder = root / "qrels"
    return sorted(p.name.split(".")[0] for p in folder.glob("*.tsv*")) if folder.is_dir() else []


def load_beir(
    root: str | Path, split: str, *, max_bad_qrels: float = 0.05, on_empty: OnEmpty = "skip"
) -> BeirDataset:
    """Read a BEIR-layout folder; qrels pointing at unknown queries or documents are dropped and
    counted, and more than `max_bad_qrels` (a fraction of the split's rows) of them is an error. Empty
    documents and queries are left out and counted (`on_empty="error"`: refused), with their qrels."""
    root = Path(root)
    if not root.is_dir():
        raise MprError(f"{root}: no such data folder")
    files: dict[str, Path] = {}
    for name in ("corpus.jsonl", "queries.jsonl"):
        found = find_path(root, name)
        if found is None:
            raise InputError(
                root / name,
                "missing file (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv)",
            )
        files[name] = found
    qrels_path = find_path(root / "qrels", f"{split}.tsv")
    if qrels_path is None:
        available = ", ".join(split_names(root)) or "none"
        raise InputError(
            root / "qrels" / f"{split}.tsv", f"split '{split}' does not exist (available: {available})"
        )
    files["qrels"] = qrels_path
    corpus = read_corpus(files["corpus.jsonl"], on_empty=on_empty)
    empty_queries: list[str] = []
    queries = read_queries(files["queries.jsonl"], on_empty=on_empty, empty=empty_queries)
    qrels, lines = read_qrels(qrels_path)
    total = sum(len(v) for v in qrels.values())
    bad: list[tuple[int, str]] = []
    blank_docs, blank_queries = set(corpus.empty), set(empty_queries)
    of_empty = 0
    for qid, judged in list(qrels.items()):
        for pid in list(judged):
            problem = None
            if qid in blank_queries or pid in blank_docs:
                of_empty += 1
                del judged[pid]
                continue
            if qid not in queries:
                problem = f"unknown query '{qid}'"
            elif pid not in corpus.index:
                problem = f"unknown document '{pid}'"
            if problem:
                bad.append((lines[(qid, pid)], problem))
                del judged[pid]
        if not judged:
            del qrels[qid]
    if total and len(bad) / total > max_bad_qrels:
        lineno, problem = min(bad)
        raise InputError(
            qrels_path,
            f"{problem}; {len(bad)} of {total} judgments point at unknown queries or documents "
            f"(more than the allowed {max_bad_qrels:.0%})",
            lineno,
        )
    if not qrels:
        raise InputError(qrels_path, "no judgments")
    return BeirDataset(
        root,
        split,
        corpus,
        queries,
        qrels,
        files,
        dropped_qrels=len(bad),
        empty_documents=len(corpus.empty),
        empty_queries=len(empty_queries),
        qrels_of_empty=of_empty,
    )


# Tevatron / RLHN rows: {"query_id", "query", "positive_passages": [{"docid", "title", "text"}],
# "negative_passages": [...]}
TEVATRON_FIELDS = ("query_id", "query", "positive_passages", "negative_passages")


@dataclass
class TevatronRow:
    qid: str
    query: str
    positives: list[tuple[str, str | None, str]]
    negatives: list[tuple[str, str | None, str]]


def _passages(
    path: Path,
    lineno: int,
    obj: dict[str, Any],
    key: str,
    on_empty: OnEmpty = "error",
    empty: dict[str, int] | None = None,
) -> list[tuple[str, str | None, str]]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(path, f"'{key}' must be a list of passages", lineno)
    out = []
    for n, passage in enumerate(value):
        if not isinstance(passage, dict):
            raise InputError(path, f"'{key}[{n}]' must be an object with docid, title, text", lineno)
        pid = passage.get("docid", passage.get("_id", passage.get("id")))
        if pid is None:
            raise InputError(path, f"'{key}[{n}]' has no 'docid'", lineno)
        text = passage.get("text")
        if text is None or (isinstance(text, str) and not text.strip()):
            if on_empty == "error":
                raise InputError(path, f"'{key}[{n}]' (docid '{pid}') has an empty text", lineno)
            if empty is not None:
                empty["empty_passages"] = empty.get("empty_passages", 0) + 1
            continue
        if not isinstance(text, str):
            raise InputError(
                path, f"'{key}[{n}]' (docid '{pid}') text must be a string, got {type(text).__name__}", lineno
            )
        title = passage.get("title")
        out.append((str(pid), title.strip() if isinstance(title, str) and title.strip() else None, text))
    return out


def iter_tevatron(
    path: str | Path, *, on_empty: OnEmpty = "skip", empty: dict[str, int] | None = None
) -> Iterator[TevatronRow]:
    """Rows of a Tevatron/RLHN JSONL(.gz) or Parquet file; a query id seen twice is an error. Empty or
    blank queries and passages are left out and counted in `empty` (`empty_queries`, `empty_passages`,
    and `queries_without_positive` for a query whose every positive was empty); `on_empty="error"`
    refuses them."""
    counts = empty if empty is not None else {}
    path = Path(path)
    _check_readable(path)
    if path.suffix == ".parquet":
        from pipeline.data.shards import read_part

        table = read_part(path)
        missing = [f for f in ("query_id", "query") if f not in table.column_names]
        if missing:
            raise InputError(
                path, f"missing column(s) {', '.join(missing)}; expected {', '.join(TEVATRON_FIELDS)}"
            )
        rows: Iterator[tuple[int, dict[str, Any]]] = enumerate(table.to_pylist(), start=1)
    else:
        rows = iter_jsonl(path)
    seen: dict[str, int] = {}
    for lineno, obj in rows:
        qid = _str_field(path, lineno, obj, "query_id")
        query = _str_field(path, lineno, obj, "query")
        if qid in seen:
            raise InputError(path, f"duplicate query_id '{qid}' (first seen on line {seen[qid]})", lineno)
        seen[qid] = lineno
        if not query.strip():
            if on_empty == "error":
                raise InputError(path, f"query '{qid}' has an empty text", lineno)
            counts["empty_queries"] = counts.get("empty_queries", 0) + 1
            continue
        if not obj.get("positive_passages"):
            raise InputError(path, f"query '{qid}' has no positive_passages", lineno)
        positives = _passages(path, lineno, obj, "positive_passages", on_empty, counts)
        if not positives:
            counts["queries_without_positive"] = counts.get("queries_without_positive", 0) + 1
            continue
        yield TevatronRow(
            qid, query, positives, _passages(path, lineno, obj, "negative_passages", on_empty, counts)
        )
