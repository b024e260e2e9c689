"""Arrow backend: one Parquet file per shard, one row per sequence.

Columns (K = top-K width, `lp` = the encoding's value type, see `encoding.py`):
    row_index int64 | input_ids list<int32> | positions list<int32>
    topk_ids list<fixed_size_list<int32>[K]> | topk_logprobs list<fixed_size_list<lp>[K]>
    target_logprob list<f32|f16> | tail_mass list<f32|f16> | [sample_counts list<fixed_size_list<uint16>[K]>]
    [sample_logz list<f32>]
    one string column per stored text field
The schema metadata key ``logitcache`` holds the shard's JSON attributes (format version, encoding, ...),
so `datasets.load_dataset("parquet", ...)` and plain pyarrow read shards with no logitcache installed.
"""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.storage.backend_base import SingleFileBackend
from logitcache.storage.bounds import check_parquet
from logitcache.storage.encoding import TAIL_MASS_DTYPE, decode_logprobs, encode_logprobs, scalar_dtype
from logitcache.storage.shard import POSITION_FIELDS, ShardData

__all__ = ["ArrowBackend", "encode_shard", "decode_shard"]

_META_KEY = b"logitcache"


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    if values.ndim == 2:
        values = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    else:
        values = pa.array(values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def encode_shard(shard: ShardData, *, encoding: str, attrs: dict) -> bytes:
    """Serialize a shard to the bytes of one Parquet file."""
    scalar = scalar_dtype(encoding)
    tok, pos = shard.token_offsets, shard.position_offsets
    columns = {
        "row_index": pa.array(shard.row_index),
        "input_ids": _list(tok, shard.input_ids),
        "positions": _list(pos, shard.positions),
        "topk_ids": _list(pos, shard.topk_ids),
        "topk_logprobs": _list(pos, encode_logprobs(shard.topk_logprobs, encoding)),
        "target_logprob": _list(pos, shard.target_logprob.astype(scalar)),
        "tail_mass": _list(pos, shard.tail_mass.astype(TAIL_MASS_DTYPE)),
    }
    if shard.sample_counts is not None:
        columns["sample_counts"] = _list(pos, shard.sample_counts)
    if shard.sample_logz is not None:
        columns["sample_logz"] = _list(pos, shard.sample_logz)
    for name, values in shard.texts.items():
        columns[name] = pa.array(values, type=pa.string())
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(attrs).encode()})
    buf = io.BytesIO()
    # Byte-stream-split + zstd is the Parquet spelling of byte-shuffle + zstd. It must be named by
    # *leaf* path for nested columns (a top-level name is silently ignored); measured on real
    # log-probs it cuts topk bytes by a third and speeds up reads ~1.6x. Dictionaries only hurt here.
    pq.write_table(table, buf, compression="zstd", compression_level=3, use_dictionary=False,
                   column_encoding={leaf: "BYTE_STREAM_SPLIT" for leaf in _numeric_leaves(table.schema)},
                   row_group_size=1 << 20, write_statistics=False)
    return buf.getvalue()


def _numeric_leaves(schema: pa.Schema) -> list[str]:
    """Parquet leaf paths of the list columns, e.g. 'topk_ids.list.element.list.element'."""
    leaves = []
    for f in schema:
        path, typ = f.name, f.type
        while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ):
            path, typ = f"{path}.list.element", typ.value_type
        if path != f.name and (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            leaves.append(path)
    return leaves


def _flat(table: pa.Table, name: str, offsets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Return (values, offsets) of a list column; checks offsets against `offsets` if given."""
    col = table.column(name).combine_chunks()
    own = col.offsets.to_numpy().astype(np.int64)
    own = own - own[0]
    if offsets is not None and not np.array_equal(own, offsets):
        raise ValueError(f"column {name} is not aligned with positions")
    values = col.flatten()
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
        return values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width), own
    return values.to_numpy(zero_copy_only=False), own


def decode_shard(payload: bytes) -> tuple[ShardData, dict]:
    """Parse Parquet bytes back into a ShardData and the shard's attributes.

    Raises any pyarrow/ValueError on malformed input; the caller wraps it into a ShardError.
    """
    table = pq.read_table(io.BytesIO(payload))
    attrs = json.loads((table.schema.metadata or {})[_META_KEY])
    input_ids, tok = _flat(table, "input_ids", None)
    positions, pos = _flat(table, "positions", None)
    columns = {name: _flat(table, name, pos)[0] for name in POSITION_FIELDS if name in table.column_names}
    texts = {name: table.column(name).to_pylist() for name in attrs.get("text_fields", [])}
    columns["topk_logprobs"] = decode_logprobs(columns["topk_logprobs"], attrs["encoding"])
    shard = ShardData.from_arrays({"row_index": table.column("row_index").to_numpy(), "input_ids": input_ids,
                                   "token_offsets": tok, "positions": positions, "position_offsets": pos,
                                   **columns}, texts=texts)
    return shard, attrs


class ArrowBackend(SingleFileBackend):
    """One Parquet file per shard (see the module docstring for its columns)."""

    name = "arrow"
    suffix = ".parquet"

    def encode(self, shard: ShardData, *, encoding: str, attrs: dict) -> bytes:
        return encode_shard(shard, encoding=encoding, attrs=attrs)

    def decode(self, payload: bytes) -> tuple[ShardData, dict]:
        return decode_shard(payload)

    def check_sizes(self, payload: bytes, *, entry: dict, k: int, text_fields, where: str) -> None:
        check_parquet(payload, entry, k, where)
