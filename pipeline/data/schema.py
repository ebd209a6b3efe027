"""The judgment-shard schema: one row is one (query, passage) judgment (see data/README.md)."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

Source = Literal["qrels", "mined", "synthetic"]
SOURCES: tuple[str, ...] = ("qrels", "mined", "synthetic")

SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("pid", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("label", pa.int8()),
        pa.field("grade", pa.float32()),
        pa.field("level", pa.int8()),
        pa.field("judge", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


def with_extra(*fields: pa.Field, base: pa.Schema = SCHEMA) -> pa.Schema:
    """The base schema plus stage-specific columns (stages may add columns, never drop one)."""
    schema = base
    for field in fields:
        if field.name not in schema.names:
            schema = schema.append(field)
    return schema


#: What `mpr mine` and `mpr ingest` write: the base schema plus `filter` (why a mined candidate was left out).
MINE_SCHEMA = with_extra(pa.field("filter", pa.string()))


def to_table(rows: dict[str, list], schema: pa.Schema) -> pa.Table:
    """Build a table from column lists; columns of `schema` that are missing are filled with nulls."""
    n = len(rows["qid"]) if "qid" in rows else 0
    arrays = [
        pa.array(rows[f.name], type=f.type) if f.name in rows else pa.nulls(n, type=f.type) for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)
