"""Convert a cache between backends (and optionally encodings), shard by shard."""

from tqdm.auto import tqdm

from logitcache.storage.cache import open_cache
from logitcache.storage.errors import ConfigError
from logitcache.storage.writer import CacheWriter

__all__ = ["convert_cache"]

_DERIVED = ("format", "format_version", "backend", "encoding", "fingerprint", "text_fields", "shards", "counts")


def convert_cache(src: str, dst: str, *, backend: str, encoding: str | None = None,
                  storage_options: dict | None = None, progress: bool = True) -> dict:
    """Rewrite cache `src` at `dst` with another backend and/or encoding. Returns the new index.

    With the same encoding the conversion is lossless: every decoded array is bit-identical.
    The fingerprint is kept: it names the teacher targets, not their byte layout.
    Resumable: shards already converted at `dst` are skipped.
    """
    cache = open_cache(src, storage_options=storage_options)
    if str(src).rstrip("/") == str(dst).rstrip("/"):
        raise ConfigError(f"convert: source and destination are the same location ({src})")
    writer = CacheWriter(dst, backend=backend, encoding=encoding or cache.index["encoding"]["name"],
                         vocab_size=cache.index["tokenizer"]["logits_width"], fingerprint=cache.fingerprint,
                         text_fields=tuple(cache.index["text_fields"]), storage_options=storage_options)
    done = writer.finished_shards()
    todo = [j for j in range(len(cache.shards)) if j not in done]
    for j, shard in tqdm(cache.iter_shards(todo), total=len(todo), desc="convert", unit="shard", disable=not progress):
        extra = {k: v for k, v in cache.shards[j].items() if k not in ("name", "sequences", "tokens", "positions", "bytes", "sha256")}
        writer.write_shard(j, shard, extra=extra)
    metadata = {k: v for k, v in cache.index.items() if k not in _DERIVED}
    counts = {k: v for k, v in cache.index["counts"].items() if k not in ("sequences", "tokens", "positions")}
    return writer.finalize(metadata, num_shards=len(cache.shards), counts=counts)
