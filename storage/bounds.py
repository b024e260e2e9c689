"""Sizes an untrusted shard declares, checked against its index entry before a byte is decoded.

Whoever writes a shard also writes the index (and its sha256), so the checksum proves nothing about
intent: a 12 KB Zarr shard that declares a (10**9,) array, or a compressed chunk that declares a
gigabyte, would be allocated by the decoder. The reader therefore checks, before decoding:

- the entry's own counts against its stored bytes (`check_entry`): what it says the shard decodes
  to may be at most `MAX_RATIO` times its bytes (plus 1 MiB), far above what teacher log-probs
  compress to (about 2-4x);
- Zarr (`check_zarr`): each array's `zarr.json` (shape exactly what the entry's counts give, chunk
  and shard shapes no larger than twice the array, a data type the format uses) and, for sharded
  arrays, each inner chunk's Blosc header (its decompressed size is exactly the chunk's); the text
  arrays' zstd frames must declare their content size, bounded by `MAX_RATIO` times their bytes;
- Parquet (`check_parquet`): the footer's row count, and every row group's and column chunk's
  uncompressed size, within what the entry's counts allow.

Each failure is a `ShardError` naming the shard and what it declared.
"""

from __future__ import annotations

import json
import math
import posixpath
import struct

from logitcache.storage.errors import ShardError

__all__ = ["MAX_RATIO", "expected_shapes", "check_entry", "check_zarr", "check_parquet", "decoded_bytes"]

MAX_RATIO = 1024
_SLACK = 1 << 20
_ITEMSIZE = {"int16": 2, "uint16": 2, "float16": 2, "int32": 4, "float32": 4, "int64": 8}
_METADATA_LIMIT = 1 << 16  # bytes of one zarr.json
_NONE = 2**64 - 1  # an empty inner chunk in a shard's index


def expected_shapes(entry: dict, k: int, text_fields) -> dict[str, tuple]:
    """{array name: shape} a shard with this entry holds; a width of None means 1..k."""
    s, t, p = entry["sequences"], entry["tokens"], entry["positions"]
    shapes = {"row_index": (s,), "token_offsets": (s + 1,), "position_offsets": (s + 1,), "input_ids": (t,),
              "positions": (p,), "target_logprob": (p,), "tail_mass": (p,), "topk_ids": (p, k),
              "topk_logprobs": (p, k), "sample_counts": (p, k), "sample_logz": (p,)}
    shapes.update({f"text/{name}": (s,) for name in text_fields})
    return shapes


def decoded_bytes(entry: dict, k: int) -> int:
    """An upper bound of the numeric arrays' decoded bytes for this entry (8 bytes an element)."""
    s, t, p = entry["sequences"], entry["tokens"], entry["positions"]
    return 8 * (3 * s + 2 + t + p * (4 + 3 * k))


def check_entry(entry: dict, k: int, where: str) -> None:
    """The entry's counts are bounded by its stored bytes (`MAX_RATIO`)."""
    if decoded_bytes(entry, k) > MAX_RATIO * entry["bytes"] + _SLACK:
        raise ShardError(f"{where}: the index says it holds {entry['sequences']} sequences, {entry['tokens']} tokens "
                         f"and {entry['positions']} positions in {entry['bytes']} bytes, more than {MAX_RATIO}x its "
                         f"size; refused before reading (a decompression bomb or a forged index)")


def _bad(where: str, what: str) -> ShardError:
    return ShardError(f"{where}: {what}; refused before decoding")


def check_zarr(files: dict[str, bytes], shapes: dict[str, tuple], where: str) -> None:
    """Check a Zarr shard's declared shapes and compressed chunk sizes (see the module docstring)."""
    for path, raw in files.items():
        if posixpath.basename(path) != "zarr.json":
            continue
        name = posixpath.dirname(path)
        if len(raw) > _METADATA_LIMIT:
            raise _bad(where, f"{path} is {len(raw)} bytes of metadata")
        meta = json.loads(raw)
        if meta.get("node_type") == "group":
            continue
        if name not in shapes:
            raise _bad(where, f"unexpected array {name!r}")
        shape, want = list(meta.get("shape") or []), shapes[name]
        if len(shape) != len(want) or any(not isinstance(d, int) or d < 0 for d in shape) or shape[0] != want[0] \
                or (len(want) == 2 and not 1 <= shape[1] <= want[1]):
            raise _bad(where, f"array {name} declares shape {shape}, the index gives {list(want)}")
        dtype = meta.get("data_type")
        if dtype != "string" and dtype not in _ITEMSIZE:
            raise _bad(where, f"array {name} has data type {dtype!r}")
        outer = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        _check_chunk(where, name, outer, shape, "chunk")
        codecs = meta.get("codecs") or []
        sharding = [c for c in codecs if c.get("name") == "sharding_indexed"]
        chunks = {p: b for p, b in files.items() if p.startswith(f"{name}/c/") or p == f"{name}/c"}
        if sharding:
            inner = sharding[0].get("configuration", {}).get("chunk_shape")
            _check_chunk(where, name, inner, outer, "inner chunk")
            for chunk_path, data in chunks.items():
                _check_shard_chunks(where, chunk_path, data, outer, inner, _ITEMSIZE[dtype])
        else:
            for chunk_path, data in chunks.items():
                _check_zstd(where, chunk_path, data)


def _check_chunk(where, name, chunk, shape, what) -> None:
    if not isinstance(chunk, list) or len(chunk) != len(shape) or any(
            not isinstance(c, int) or not 1 <= c <= max(1, 2 * d) for c, d in zip(chunk, shape)):
        raise _bad(where, f"array {name} declares {what} shape {chunk} for shape {shape}")


def _check_shard_chunks(where, path, data: bytes, outer, inner, itemsize: int) -> None:
    """A shard object's index (at its end: (offset, nbytes) uint64 pairs, then a crc32c) and, for each
    inner chunk, the decompressed size in its Blosc header."""
    n = math.prod(-(-o // i) for o, i in zip(outer, inner))
    size = 16 * n + 4
    if len(data) < size:
        raise _bad(where, f"{path} is shorter than its shard index")
    pairs = struct.unpack_from(f"<{2 * n}Q", data, len(data) - size)
    want = math.prod(inner) * itemsize
    for offset, nbytes in zip(pairs[::2], pairs[1::2]):
        if offset == _NONE and nbytes == _NONE:
            continue
        if nbytes < 16 or offset + nbytes > len(data) - size:
            raise _bad(where, f"{path}: an inner chunk lies outside the object")
        declared = struct.unpack_from("<I", data, offset + 4)[0]
        if declared != want:
            raise _bad(where, f"{path}: a compressed chunk declares {declared} bytes, its shape holds {want}")


def _check_zstd(where, path, data: bytes) -> None:
    """A zstd frame must declare its content size, and it must be within `MAX_RATIO` of the frame."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        raise _bad(where, f"{path} is not one zstd frame")
    desc = data[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(data) < at + width:
        raise _bad(where, f"{path}: a compressed chunk does not declare its size")
    content = int.from_bytes(data[at:at + width], "little") + (256 if width == 2 else 0)
    if content > MAX_RATIO * len(data) + _SLACK:
        raise _bad(where, f"{path}: a {len(data)}-byte chunk declares {content} bytes (a decompression bomb)")


def check_parquet(payload: bytes, entry: dict, k: int, where: str) -> None:
    """The footer's rows and uncompressed sizes against the entry (see the module docstring)."""
    import io

    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(payload)).metadata
    except Exception as e:  # noqa: BLE001 - an unreadable footer of untrusted bytes
        raise _bad(where, f"unreadable Parquet footer ({e.__class__.__name__}: {e})") from None
    if meta.num_rows != entry["sequences"]:
        raise _bad(where, f"its footer declares {meta.num_rows} rows, the index {entry['sequences']} sequences")
    # Numeric columns decode to at most `decoded_bytes` (plus list offsets); text to MAX_RATIO x the file.
    budget = 2 * decoded_bytes(entry, k) + MAX_RATIO * len(payload) + _SLACK
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            size = group.column(c).total_uncompressed_size
            if size < 0 or size > budget:
                raise _bad(where, f"column chunk {group.column(c).path_in_schema} declares {size} bytes")
            total += size
    if total > budget:
        raise _bad(where, f"its footer declares {total} uncompressed bytes, more than the index allows ({budget})")
