"""`--streaming`: the selected rows of data files read lazily, a shard's rows when the shard is computed.

    rows, info = stream_rows("s3://bucket/corpus/", split="train[:10000]", storage_options=None)
    len(rows)                                        # 10000; reading only what that takes (below)
    rows.select_columns(["text"])[2000:3000]         # {"text": [...]}: rows 2000..2999, read now

A 10,000-row slice of a dataset of thousands of files must not download the dataset. Files are
taken in sorted path order (the row numbering of `datasets.load_dataset` on the same files) and
only as far as the slice reaches:
- Parquet: the plan reads each needed file's footer (row count per row group); a shard reads only
  the row groups holding its rows, and only the input columns. A resumed job skips finished shards
  without reading their rows.
- JSON lines: there is no row count without reading, so the plan reads the selected rows' bytes
  once, keeping each row's byte offset; a shard seeks to its first row and reads its own lines.
  A resumed job re-reads the selected rows' bytes once (deterministically) to plan.
Row r of the slice is always the same row, so the row -> shard plan is the non-streaming one.

The fingerprint (the cache's `dataset.fingerprint`) cannot hash the contents without reading them:
it hashes each touched file's path, size and the store's own content tag where it has one (S3
ETag, the Hub's blob id or LFS sha256; local files: size and modification time), and the row range.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from pathlib import PurePosixPath

import numpy as np

from logitcache.storage.data_files import list_data_files
from logitcache.storage.errors import ConfigError, InvalidDataError

__all__ = ["StreamedRows", "stream_rows", "STREAM_SUFFIXES", "parse_row_range"]

STREAM_SUFFIXES = {".parquet": "parquet", ".jsonl": "json"}
# Parquet reads are exact byte ranges (the footer, then column chunks): a read-ahead cache would fetch
# the neighbouring columns and row groups too (s3fs reads 50 MiB ahead by default).
_EXACT = {"cache_type": "none"}
_SLICE = re.compile(r"^(?P<base>[\w.-]+)(\[(?P<a>\d*):(?P<b>\d*)\])?$")


def parse_row_range(split: str | None, max_rows: int | None, *, data: str) -> tuple[str, int, int | None]:
    """(split name, first row, end row or None) of `--split NAME[a:b]` and `--max-rows N` (the first N of
    the slice).

    Raises:
        ConfigError: a percentage slice (streaming cannot know the total), or an empty range.
    """
    m = _SLICE.match(split or "train")
    if m is None:
        raise ConfigError(f"--data {data} --streaming: --split {split}: streaming takes 'train' or a row slice "
                          f"'train[A:B]' (percentages need the row count, which streaming does not read)")
    start = int(m["a"]) if m["a"] else 0
    end = int(m["b"]) if m["b"] else None
    if max_rows is not None:
        end = start + max_rows if end is None else min(end, start + max_rows)
    if end is not None and end <= start:
        raise ConfigError(f"--data {data}: the row range [{start}:{end}] is empty")
    return m["base"], start, end


class StreamedRows:
    """The rows [start, end) of `files`, numbered from 0, read on demand (module docstring).

    Args:
        fs: the fsspec filesystem; files: paths in it, in row order, all .parquet or all .jsonl.
        start, end: the slice of the files' rows (end None: to the end, counting every file).
        data: the --data value, for messages.
    """

    def __init__(self, fs, files: list[str], *, start: int, end: int | None, data: str, columns: list[str] | None = None,
                 _plan=None):
        self.fs, self.files, self.start, self.end, self.data = fs, list(files), start, end, data
        self.kind = STREAM_SUFFIXES[PurePosixPath(files[0]).suffix]
        self._columns = columns
        if _plan is None:
            _plan = self._make_plan()
        self._plan = _plan
        self.num_rows, self.touched, self.column_names = _plan["num_rows"], _plan["touched"], _plan["column_names"]

    # ---- the plan: rows per file, up to `end` -------------------------------------------------------

    def _make_plan(self) -> dict:
        starts, touched, offsets, names, total, footers = [], [], [], None, 0, []
        for f in self.files:
            if self.end is not None and total >= self.end:
                break
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                with self.fs.open(f, "rb", **_EXACT) as fh:
                    meta = pq.ParquetFile(fh).metadata
                footers.append(meta)  # kept: a shard's read then fetches its column chunks alone
                groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                if names is None:
                    names = list(meta.schema.to_arrow_schema().names)
                offsets.append(np.concatenate([[0], np.cumsum(groups)]).astype(np.int64))
                n = int(sum(groups))
            else:
                lines, first = self._scan_lines(f, None if self.end is None else self.end - total)
                offsets.append(lines)
                n = len(lines)
                if names is None and first is not None:
                    names = list(first)
            starts.append(total)
            touched.append(f)
            total += n
        if names is None:
            raise ConfigError(f"--data {self.data}: no rows in its files")
        end = total if self.end is None else min(self.end, total)
        if end <= self.start:
            raise InvalidDataError(f"--data {self.data}: {total} row(s); the slice starts at row {self.start}")
        return {"num_rows": end - self.start, "touched": touched, "starts": starts, "offsets": offsets,
                "column_names": names, "footers": footers}

    def _scan_lines(self, f: str, limit: int | None) -> tuple[np.ndarray, dict | None]:
        """(byte offsets of the file's first `limit` JSON lines (all without a limit), the first row or None)."""
        found, pos, first = [], 0, None
        with self.fs.open(f, "rb") as fh:
            for line in fh:
                if line.strip():
                    if limit is not None and len(found) >= limit:
                        break
                    if first is None:
                        try:
                            first = json.loads(line)
                        except ValueError as e:
                            raise InvalidDataError(f"--data {self.data}: {f} row 0: not valid JSON ({e})") from None
                        if not isinstance(first, dict):
                            raise InvalidDataError(f"--data {self.data}: {f}: each line must be one JSON object")
                    found.append(pos)
                pos += len(line)
        return np.asarray(found, dtype=np.int64), first

    # ---- the Dataset surface stage one uses ------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_rows

    def select_columns(self, columns: list[str]) -> "StreamedRows":
        return StreamedRows(self.fs, self.files, start=self.start, end=self.end, data=self.data,
                            columns=list(columns), _plan=self._plan)

    def __getitem__(self, rows: slice) -> dict[str, list]:
        """Rows [a, b) of the slice, columnar: {column: [values]}."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("StreamedRows reads contiguous row ranges: rows[a:b]")
        a, b, _ = rows.indices(self.num_rows)
        a, b = a + self.start, b + self.start
        columns = self._columns or self.column_names
        out = {c: [] for c in columns}
        starts = self._plan["starts"]
        for i in range(max(bisect.bisect_right(starts, a) - 1, 0), len(starts)):
            lo, offsets = starts[i], self._plan["offsets"][i]
            n = int(offsets[-1]) if self.kind == "parquet" else len(offsets)
            if lo >= b:
                break
            x, y = max(a, lo) - lo, min(b, lo + n) - lo
            if y <= x:
                continue
            f = self._plan["touched"][i]
            if self.kind == "parquet":
                block = self._parquet_rows(f, self._plan["footers"][i], offsets, x, y, columns)
            else:
                rows_ = self._jsonl_rows(f, offsets[x:y], x)
                block = {c: [r.get(c) for r in rows_] for c in columns}
            for c in columns:
                out[c].extend(block[c])
        return out

    def _parquet_rows(self, f: str, footer, offsets: np.ndarray, x: int, y: int, columns: list[str]) -> dict[str, list]:
        import pyarrow.parquet as pq

        first = int(np.searchsorted(offsets, x, side="right")) - 1
        last = int(np.searchsorted(offsets, y, side="left"))  # groups [first, last)
        with self.fs.open(f, "rb", **_EXACT) as fh:
            table = pq.ParquetFile(fh, metadata=footer).read_row_groups(list(range(first, last)), columns=columns)
        table = table.slice(x - int(offsets[first]), y - x)
        return {c: table.column(c).to_pylist() for c in columns}

    def _jsonl_rows(self, f: str, offsets: np.ndarray, first: int) -> list[dict]:
        rows = []
        if len(offsets) == 0:
            return rows
        with self.fs.open(f, "rb") as fh:
            fh.seek(int(offsets[0]))
            while len(rows) < len(offsets):
                line = fh.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                number = first + len(rows)
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise InvalidDataError(f"--data {self.data}: {f} line of row {number}: not valid JSON "
                                           f"({e})") from None
                if not isinstance(row, dict):
                    raise InvalidDataError(f"--data {self.data}: {f} row {number}: a JSON {type(row).__name__}; "
                                           f"each line must be one JSON object")
                rows.append(row)
        return rows

    # ---- identity ----------------------------------------------------------------------------------------

    def fingerprint(self, root: str) -> str:
        """sha256 over the touched files' (path, size, content tag) and the row range (module docstring)."""
        h = hashlib.sha256(f"streaming\0{self.start}\0{self.start + self.num_rows}\n".encode())
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        # HfFileSystem lists name, size and type only, unless asked for the blob id and LFS hash.
        expand = {"expand_info": True} if "hf" in protocols else {}
        for f in self.touched:
            info = self.fs.info(f, **expand)
            tag = next((str(info[k]) for k in ("ETag", "etag", "blob_id", "sha256", "md5") if info.get(k)), None)
            if tag is None and isinstance(info.get("lfs"), dict):
                tag = str(info["lfs"].get("sha256") or info["lfs"].get("oid"))
            if tag is None:
                tag = f"mtime={info.get('mtime') or info.get('LastModified') or info.get('last_modified')}"
            rel = PurePosixPath(f).relative_to(root).as_posix() if f != root else PurePosixPath(f).name
            h.update(f"{rel}\0{info.get('size')}\0{tag}\n".encode())
        return h.hexdigest()


def stream_rows(data: str, *, split: str | None, max_rows: int | None, storage_options: dict | None = None):
    """Rows of a local or fsspec file/folder of .parquet or .jsonl files, read lazily (module docstring).

    Returns:
        (StreamedRows, info), info as `rows.load_rows` gives it: loader "stream:parquet|json",
        fingerprint, num_rows (of the slice), and files_read (the files the slice reaches).

    Raises:
        ConfigError: no such path, no files, files of several or other kinds, a bad split.
    """
    base, start, end = parse_row_range(split, max_rows, data=data)
    if base != "train":
        raise ConfigError(f"--data {data}: files are one 'train' split; got --split {split}")
    fs, root, files = list_data_files(data, storage_options)
    kinds = {PurePosixPath(f).suffix for f in files}
    if not files or not kinds <= set(STREAM_SUFFIXES) or len(kinds) > 1:
        raise ConfigError(f"--data {data} --streaming: expected files of one kind, .parquet or .jsonl; found "
                          f"{sorted(kinds) or 'none'} (other kinds load without --streaming)")
    rows = StreamedRows(fs, files, start=start, end=end, data=data)
    info = {"loader": f"stream:{rows.kind}", "fingerprint": rows.fingerprint(root),
            "files_read": len(rows.touched), "files": len(files)}
    return rows, info
