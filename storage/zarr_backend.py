"""Zarr v3 backend: one Zarr group (a folder) per shard, arrays along the token and position axes.

Group ``shard-NNNNN.zarr/``:
    row_index (S,) int64 | token_offsets (S+1,) int64 | position_offsets (S+1,) int64
    input_ids (T,) int32 | positions (P,) int32
    topk_ids (P, K) int32 | topk_logprobs (P, K) f32|f16|int16 (see `encoding.py`)
    target_logprob (P,) | tail_mass (P,) | [sample_counts (P, K) uint16] | [sample_logz (P,) float32]
    text/<field> (S,) string
Ragged sequences are offsets into the flat arrays. Arrays are chunked along their first axis and
stored with Zarr's sharding codec (one object per array), compressed with Blosc(zstd, byte-shuffle).
Group attribute ``logitcache`` holds the shard's JSON attributes. Only zarr's public v3 API is used,
and plain `zarr.open_group(path)` reads a shard with no logitcache installed.
"""

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from logitcache.storage.backend_base import FolderBackend
from logitcache.storage.bounds import check_zarr, expected_shapes
from logitcache.storage.encoding import TAIL_MASS_DTYPE, decode_logprobs, encode_logprobs, scalar_dtype
from logitcache.storage.shard import ARRAY_FIELDS, ShardData

__all__ = ["ZarrBackend", "encode_shard", "decode_shard"]

_CHUNK_ROWS = 8192


def _put(group: zarr.Group, name: str, values: np.ndarray) -> None:
    rows = max(1, min(len(values), _CHUNK_ROWS))
    chunks = (rows, *values.shape[1:])
    n_chunks = max(1, -(-len(values) // rows))
    if values.dtype.kind == "O" or values.dtype.kind == "U":
        arr = group.create_array(name, shape=values.shape, dtype=str, chunks=chunks)
    else:
        arr = group.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=chunks,
            shards=(rows * n_chunks, *values.shape[1:]),
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=values.dtype.itemsize),
        )
    if len(values):
        arr[...] = values


def encode_shard(shard: ShardData, *, encoding: str, attrs: dict) -> dict[str, bytes]:
    """Serialize a shard as a Zarr v3 group. Returns {relative path: bytes}."""
    files: dict = {}
    group = zarr.open_group(store=MemoryStore(store_dict=files), mode="w", zarr_format=3)
    group.attrs["logitcache"] = attrs
    scalar = scalar_dtype(encoding)
    arrays = {
        "row_index": shard.row_index, "token_offsets": shard.token_offsets,
        "position_offsets": shard.position_offsets, "input_ids": shard.input_ids,
        "positions": shard.positions, "topk_ids": shard.topk_ids,
        "topk_logprobs": encode_logprobs(shard.topk_logprobs, encoding),
        "target_logprob": shard.target_logprob.astype(scalar), "tail_mass": shard.tail_mass.astype(TAIL_MASS_DTYPE),
    }
    if shard.sample_counts is not None:
        arrays["sample_counts"] = shard.sample_counts
    if shard.sample_logz is not None:
        arrays["sample_logz"] = shard.sample_logz
    for name, values in arrays.items():
        _put(group, name, np.ascontiguousarray(values))
    for name, values in shard.texts.items():
        _put(group, f"text/{name}", np.array(values, dtype=object))
    return {path: buf.to_bytes() for path, buf in files.items()}


def decode_shard(files: dict[str, bytes]) -> tuple[ShardData, dict]:
    """Parse a Zarr group given as {relative path: bytes}. Raises on malformed input."""
    store = MemoryStore(store_dict={k: cpu.Buffer.from_bytes(v) for k, v in files.items()}, read_only=True)
    group = zarr.open_group(store=store, mode="r", zarr_format=3)
    attrs = dict(group.attrs["logitcache"])
    arrays = {name: group[name][...] for name in ARRAY_FIELDS if name in group}
    arrays["topk_logprobs"] = decode_logprobs(arrays["topk_logprobs"], attrs["encoding"])
    texts = {name: [str(v) for v in group[f"text/{name}"][...]] for name in attrs.get("text_fields", [])}
    return ShardData.from_arrays(arrays, texts=texts), attrs


class ZarrBackend(FolderBackend):
    """One Zarr v3 group (a folder) per shard (see the module docstring for its arrays)."""

    name = "zarr"
    suffix = ".zarr"

    def encode(self, shard: ShardData, *, encoding: str, attrs: dict) -> dict[str, bytes]:
        return encode_shard(shard, encoding=encoding, attrs=attrs)

    def decode(self, payload: dict[str, bytes]) -> tuple[ShardData, dict]:
        return decode_shard(payload)

    def check_sizes(self, payload: dict[str, bytes], *, entry: dict, k: int, text_fields, where: str) -> None:
        check_zarr(payload, expected_shapes(entry, k, text_fields), where)
