"""`CacheWriter`: writes shards atomically, records each as an entry, and finalizes the index.

Layout of a cache: see `layout.py` and docs/FORMAT.md. Stage one resumes by skipping shards whose
entry exists; independent jobs (`precompute --num-jobs N --job-index I`) each write their own shards
and entries, and `finalize` (a.k.a. merge) turns the entries into one index, refusing gaps,
duplicates or entries from a run with other settings. A killed job leaves temporary files, which
`remove_stale_temporaries` deletes when that job's shards are written again.
"""

import json
import posixpath
from collections.abc import Collection

from logitcache.storage import layout
from logitcache.storage.backends import get_backend, read_shard_files, shard_name, write_shard_files
from logitcache.storage.encoding import COMPACT_STEP, check_encoding
from logitcache.storage.errors import CacheIndexError, ConfigError, LogitCacheError, ShardError, io_failure
from logitcache.storage.index import FORMAT_NAME, FORMAT_VERSION, write_index
from logitcache.storage.paths import atomic_write_bytes, resolve, safe_join
from logitcache.storage.shard import ShardData

__all__ = ["CacheWriter"]


class CacheWriter:
    """Write one cache's shards and, at the end, its index.

    Args:
        root: cache directory or fsspec URL.
        backend: "zarr" or "arrow".
        encoding: "lossless", "float16" or "compact".
        vocab_size: the model's logits width; every stored id must be below it.
        fingerprint: the cache's chained fingerprint; entries from runs with another one are refused.
        text_fields: names of the per-sequence text columns.
        storage_options: passed to fsspec.
    """

    def __init__(self, root: str, *, backend: str, encoding: str, vocab_size: int, fingerprint: str,
                 text_fields: tuple[str, ...] = (), storage_options: dict | None = None):
        get_backend(backend)
        self.backend, self.encoding = backend, check_encoding(encoding)
        self.vocab_size, self.fingerprint, self.text_fields = vocab_size, fingerprint, tuple(text_fields)
        self.fs, self.root = resolve(root, storage_options)
        self.url = str(root)

    def _entry_path(self, name: str) -> str:
        return safe_join(self.root, layout.entry_name(name))

    def is_finished(self) -> bool:
        return self.fs.exists(safe_join(self.root, layout.INDEX_NAME))

    def shard_entries(self, *, progress: bool = False) -> dict[int, dict]:
        """Every shard entry in the cache, by shard id, whether or not its shard is still intact.
        One read per entry (on an object store, one request each): `progress` shows a bar on stderr.

        Raises:
            ConfigError: an entry was written with another fingerprint, backend or encoding.
        """
        entry_dir = safe_join(self.root, layout.ENTRIES_DIR)
        if not self.fs.exists(entry_dir):
            return {}
        from tqdm.auto import tqdm

        entries = {}
        paths = self.fs.ls(entry_dir, detail=False)
        for path in tqdm(paths, desc="read shard entries", unit="shard", disable=not progress):
            shard_id = layout.entry_shard_id(posixpath.basename(path))
            if shard_id is None:
                continue  # temporary files of an interrupted write
            try:
                entry = json.loads(self.fs.cat_file(path))
            except ValueError as e:
                raise ShardError(f"{path}: unreadable shard entry ({e})") from None
            for key, mine in (("fingerprint", self.fingerprint), ("backend", self.backend), ("encoding", self.encoding)):
                if entry.get(key) != mine:
                    raise ConfigError(
                        f"{self.url} holds shards written with {key}={entry.get(key)!r}, but this run has "
                        f"{key}={mine!r}. Use another output location, or delete that cache to start over.")
            entries[shard_id] = entry
        return entries

    def damaged_shards(self, entries: dict[int, dict], *, verify: Collection[int] = ()) -> dict[int, str]:
        """The shards among `entries` that are missing or whose stored size differs from their entry
        (one listing of the cache), and of the ids in `verify`, those whose sha256 differs (a full read).

        Returns:
            {shard id: what is wrong}, empty when every shard is intact.
        """
        sizes = self._stored_sizes()
        damaged = {}
        for shard_id, entry in sorted(entries.items()):
            size = sizes.get(entry["name"])
            if size is None:
                damaged[shard_id] = "missing"
            elif size != entry["bytes"]:
                damaged[shard_id] = f"{size} bytes stored, its entry says {entry['bytes']} (truncated or replaced)"
            elif shard_id in verify:
                payload = read_shard_files(self.fs, safe_join(self.root, entry["name"]), self.backend)
                if get_backend(self.backend).checksum(payload) != entry["sha256"]:
                    damaged[shard_id] = "checksum mismatch (corrupted)"
        return damaged

    def _stored_sizes(self) -> dict[str, int]:
        """{shard name: bytes stored under it} from one recursive listing (a folder shard: its files summed)."""
        self.fs.invalidate_cache(self.root)  # another process may have changed it since we last looked
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        sizes: dict[str, int] = {}
        for path, info in found.items():
            top = path[len(prefix):].split("/", 1)[0] if path.startswith(prefix) else ""
            if layout.shard_id_of(top) is not None:
                sizes[top] = sizes.get(top, 0) + int(info.get("size") or 0)
        return sizes

    def finished_shards(self, *, progress: bool = False) -> dict[int, dict]:
        """Entries of shards already written by this or a compatible earlier run and still intact
        (present, of the size their entry records), by shard id; `progress`: see `shard_entries`.

        Raises:
            ConfigError: an entry was written with another fingerprint, backend or encoding.
        """
        entries = self.shard_entries(progress=progress)
        damaged = self.damaged_shards(entries)
        return {i: e for i, e in entries.items() if i not in damaged}

    def remove_stale_temporaries(self, shard_ids) -> int:
        """Delete the temporary files (shards and entries) a killed run left for these shards.

        Only the given shards (a job's own): another job may be writing its shards right now.
        Object stores hold no temporaries (shards are uploaded in place), so there this finds none.

        Returns:
            How many files or folders were removed.
        """
        ids = set(shard_ids)
        removed = 0
        for folder in (self.root, safe_join(self.root, layout.ENTRIES_DIR)):
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                if layout.temporary_shard_id(posixpath.basename(path.rstrip("/"))) in ids:
                    self.fs.rm(path, recursive=True)
                    removed += 1
        return removed

    def write_shard(self, shard_id: int, shard: ShardData, *, extra: dict | None = None) -> dict:
        """Validate and write one shard, then record its entry. Returns the entry.

        Args:
            shard_id: 0-based; names the shard (`layout.shard_name`).
            shard: the contents; validated before a byte is written.
            extra: JSON-able facts kept in the entry and the index (e.g. the source rows it covers).
        """
        name = shard_name(self.backend, shard_id)
        if set(shard.texts) != set(self.text_fields):
            raise ConfigError(f"{name}: text fields {sorted(shard.texts)} != declared {sorted(self.text_fields)}")
        shard.validate(vocab_size=self.vocab_size, where=name)
        attrs = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "encoding": self.encoding,
                 "compact_step": COMPACT_STEP, "fingerprint": self.fingerprint, "shard": name,
                 "text_fields": list(self.text_fields)}
        payload = get_backend(self.backend).encode(shard, encoding=self.encoding, attrs=attrs)
        try:
            sha, nbytes = write_shard_files(self.fs, safe_join(self.root, name), self.backend, payload)
            entry = {"name": name, "sequences": shard.num_sequences, "tokens": shard.num_tokens,
                     "positions": shard.num_positions, "bytes": nbytes, "sha256": sha, **(extra or {})}
            record = {**entry, "fingerprint": self.fingerprint, "backend": self.backend, "encoding": self.encoding}
            atomic_write_bytes(self.fs, self._entry_path(name), json.dumps(record, sort_keys=True).encode())
        except LogitCacheError:
            raise
        except Exception as e:  # a disk full, a store gone: the shard has no entry, so it does not exist
            failure = io_failure(e, f"writing {name} of {self.url} (not recorded; a rerun rewrites it)")
            if failure is None:
                raise
            raise failure from e
        return entry

    def finalize(self, metadata: dict, *, num_shards: int | None = None, counts: dict | None = None,
                 done: dict[int, dict] | None = None) -> dict:
        """Gather every shard entry into the index and write it atomically. Returns the index.

        Args:
            metadata: the descriptive sections: teacher, tokenizer, dataset, inputs, sparsification, engine.
            num_shards: the expected shard count; any missing id is an error. Default: ids 0..max.
            counts: extra counts to record (e.g. skipped or truncated rows), added to the totals.
            done: `finished_shards()` as the caller just read it (listing an object store is slow);
                default: read here.

        Raises:
            CacheIndexError: shards are missing or two shards claim the same source rows.
        """
        done = self.finished_shards() if done is None else done
        expected = range(num_shards if num_shards is not None else (max(done) + 1 if done else 0))
        missing = [i for i in expected if i not in done]
        if missing:
            raise CacheIndexError(f"{self.url}: cannot finalize, {len(missing)} shard(s) not written yet: "
                                  f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if not done:
            raise CacheIndexError(f"{self.url}: cannot finalize a cache with no shards")
        entries = [{k: v for k, v in done[i].items() if k not in ("fingerprint", "backend", "encoding")} for i in expected]
        _check_disjoint_rows(entries, self.url)
        totals = {key: sum(e[key] for e in entries) for key in ("sequences", "tokens", "positions")}
        index = {**metadata, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "backend": self.backend,
                 "encoding": {"name": self.encoding, "compact_step": COMPACT_STEP}, "fingerprint": self.fingerprint,
                 "text_fields": list(self.text_fields), "counts": {**(counts or {}), **totals}, "shards": entries}
        write_index(self.fs, self.root, index)
        # The card makes the folder a dataset repo (`datasets.load_dataset(folder)` reads the shards only).
        from logitcache.storage.card import CARD_NAME, dataset_card, shard_schema

        card = dataset_card(index, schema=shard_schema(self.fs, self.root, index))
        atomic_write_bytes(self.fs, safe_join(self.root, CARD_NAME), card.encode())
        return index


def _check_disjoint_rows(entries: list[dict], where: str) -> None:
    spans = sorted((tuple(e["rows"]), e["name"]) for e in entries if "rows" in e)
    for (a, name_a), (b, name_b) in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise CacheIndexError(f"{where}: {name_a} (rows {a}) and {name_b} (rows {b}) overlap")
