"""The cache index: schema, atomic read/write, and the chained fingerprint.

``index.json`` is written last and atomically; a cache without one is unfinished. See docs/FORMAT.md.
"""

import hashlib
import json

from logitcache.storage.backends import BACKENDS
from logitcache.storage.errors import CacheIndexError, FormatVersionError, io_failure
from logitcache.storage.inputs import validate_inputs
from logitcache.storage.layout import INDEX_NAME
from logitcache.storage.paths import atomic_write_bytes, safe_join

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "INDEX_NAME", "read_index", "write_index", "validate_index",
           "chain_fingerprint", "canonical_json"]

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 1

# Sections every index carries; the descriptive ones (teacher, dataset, engine) are free-form dicts, `inputs`
# follows `storage.inputs` (how the cached text became tokens).
_SECTIONS = ("teacher", "tokenizer", "dataset", "inputs", "sparsification", "encoding", "engine", "counts")
_SHARD_KEYS = {"name": str, "sequences": int, "tokens": int, "positions": int, "bytes": int, "sha256": str}


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_fingerprint(*parts) -> str:
    """HF-datasets-style chained hash: h_i = sha256(h_{i-1} + canonical_json(part_i))."""
    h = ""
    for part in parts:
        h = hashlib.sha256((h + canonical_json(part)).encode()).hexdigest()
    return h


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CacheIndexError(f"{where}: {msg}")


def validate_index(index, where: str = INDEX_NAME) -> dict:
    """Check an index dict against the schema. Returns it unchanged.

    Raises:
        FormatVersionError: another format or a version this library cannot read.
        UnsafePathError: a shard name escapes the cache.
        CacheIndexError: anything else missing or of the wrong type, naming the field.
    """
    _require(isinstance(index, dict), where, "the index must be a JSON object")
    if index.get("format") != FORMAT_NAME:
        raise FormatVersionError(f"{where}: not a logitcache index (format={index.get('format')!r})")
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(f"{where}: format_version {version!r} is not supported "
                                 f"(this logitcache reads version {FORMAT_VERSION})")
    _require(index.get("backend") in BACKENDS, where, f"backend must be one of {tuple(BACKENDS)}, got {index.get('backend')!r}")
    _require(isinstance(index.get("fingerprint"), str), where, "fingerprint must be a string")
    for section in _SECTIONS:
        _require(isinstance(index.get(section), dict), where, f"section {section!r} is missing or not an object")
    tok = index["tokenizer"]
    for key in ("vocab_size", "logits_width"):
        _require(isinstance(tok.get(key), int) and tok[key] > 0, where, f"tokenizer.{key} must be a positive int")
    sp = index["sparsification"]
    _require(sp.get("mode") in ("topk", "sample"), where, "sparsification.mode must be 'topk' or 'sample'")
    _require(isinstance(sp.get("k"), int) and sp["k"] > 0, where, "sparsification.k must be a positive int")
    _require(isinstance(index.get("text_fields"), list), where, "text_fields must be a list")
    validate_inputs(index["inputs"], index["text_fields"], where)
    shards = index.get("shards")
    _require(isinstance(shards, list), where, "shards must be a list")
    names = set()
    for i, entry in enumerate(shards):
        _require(isinstance(entry, dict), where, f"shards[{i}] must be an object")
        for key, typ in _SHARD_KEYS.items():
            ok = isinstance(entry.get(key), typ) and not isinstance(entry.get(key), bool)
            _require(ok and (typ is not int or entry[key] >= 0), where, f"shards[{i}].{key} must be a {typ.__name__} >= 0")
        safe_join("", entry["name"])  # raises UnsafePathError
        _require(entry["name"] not in names, where, f"shards[{i}].name {entry['name']!r} appears twice")
        names.add(entry["name"])
    counts = index["counts"]
    for key in ("sequences", "tokens", "positions"):
        total = sum(e[key] for e in shards)
        _require(counts.get(key) == total, where, f"counts.{key}={counts.get(key)!r} but the shards sum to {total}")
    return index


def read_index(fs, root: str) -> dict:
    """Read and validate ``root/index.json``.

    Raises:
        CacheIndexError: no index (an unfinished or empty cache), unreadable JSON, or a bad schema.
    """
    path = safe_join(root, INDEX_NAME)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise CacheIndexError(f"{path}: no index; the cache is unfinished (stage one has not completed) "
                              f"or this is not a logitcache cache") from None
    except Exception as e:  # unreachable endpoint, bad credentials, ...: say where, not a library traceback
        failure = io_failure(e, f"{path}: cannot read the index")
        if failure is not None:
            raise failure from None
        raise CacheIndexError(f"{path}: cannot read the index ({e.__class__.__name__}: {e})") from None
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CacheIndexError(f"{path}: index is not valid JSON ({e})") from None
    return validate_index(index, where=path)


def write_index(fs, root: str, index: dict) -> None:
    """Validate, then atomically replace ``root/index.json``."""
    validate_index(index, where=f"{root}/{INDEX_NAME}")
    atomic_write_bytes(fs, safe_join(root, INDEX_NAME), (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
