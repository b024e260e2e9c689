"""Rows of --data for both stages: a file or folder (local or any fsspec URL), a save_to_disk folder, or a hub dataset.

    rows, info = load_rows("s3://bucket/corpus/", split="train[:1000]", storage_options={...})
    rows, info = load_rows("data/train.jsonl")               # datasets.Dataset, {"fingerprint": ..., ...}

Stage one encodes them for the teacher (`info` is the index's `dataset` section); stage two trains a
student on them (`train --data`, `eval --data`). One loader, so both take the same DATA.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from logitcache.storage.data_files import list_data_files
from logitcache.storage.errors import ConfigError, InvalidDataError, LogitCacheError
from logitcache.storage.redact import redact_url

__all__ = ["load_rows", "unreadable_files"]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def load_rows(data: str, *, split: str | None = None, config_name: str | None = None, revision: str | None = None,
              storage_options: dict | None = None, streaming: bool = False, max_rows: int | None = None):
    """Load DATA as a `datasets.Dataset` (with `streaming`: rows read lazily) and describe it.

    DATA is, in this order: a `save_to_disk` folder (a Dataset, or a DatasetDict with `split`);
    a local .jsonl/.json/.parquet/.arrow file, or a folder of such files (one kind; split names
    come from file names as in `datasets.load_dataset(folder)`, e.g. `data/test-*.parquet`; all
    files are "train" otherwise); an fsspec URL (s3://, gs://, hf://, https://, ...) of such a file
    or folder (`storage_options` and the usual credentials reach fsspec); else a hub dataset id
    (at `revision`). `split` defaults to "train"; slices such as "train[:1000]" work for files and
    hub datasets. `max_rows` keeps the first N rows (of the slice).

    With `streaming`, nothing is read beyond the selected rows: .parquet/.jsonl files (local or
    any fsspec URL, hf:// included) become a `streaming.StreamedRows` that reads a shard's rows when
    asked (Parquet: footers, then only the needed row groups); a hub dataset id is streamed with
    `datasets.load_dataset(..., streaming=True)` and its first rows of the slice are kept (this needs
    `max_rows` or a row slice, since a stream has no length).

    Returns:
        (dataset, info), info being the index's `dataset` section: source, split, loader,
        num_rows and fingerprint. The fingerprint is a sha256 of the files' bytes for local
        files (so a copy elsewhere has the same one), the saved `_fingerprint` for
        `save_to_disk` folders, and datasets' `_fingerprint` (which follows the hub revision)
        for hub datasets.

    Raises:
        ConfigError: the path does not exist, holds no data files, mixes kinds, names an unknown
            split, or the hub dataset cannot be loaded.
    """
    import datasets

    if max_rows is not None and not (isinstance(max_rows, int) and max_rows >= 1):
        raise ConfigError(f"--max-rows {max_rows!r} must be a positive integer")
    path = Path(os.path.expanduser(data))
    if streaming:
        return _load_streaming(data, path, split=split, config_name=config_name, revision=revision,
                               storage_options=storage_options, max_rows=max_rows)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None and len(loaded) == 1:
                split = next(iter(loaded))
            if split not in loaded:
                raise ConfigError(f"--data {data}: split {split!r} not found; it has {sorted(loaded)} (use --split)")
            ds = loaded[split]
        else:
            if split is not None:
                raise ConfigError(f"--data {data}: a saved Dataset has no splits; drop --split {split}")
            ds = loaded
        info = {"loader": "save_to_disk", "fingerprint": ds._fingerprint}
    elif path.exists():
        files = _data_files(path, data)
        if path.is_dir():
            # datasets' own rules pick each split's files (e.g. data/train-*.parquet vs data/test-*.parquet).
            by_split = {str(k): v for k, v in datasets.load_dataset_builder(str(path)).config.data_files.items()}
            base = (split or "train").split("[")[0]
            if base not in by_split:
                raise ConfigError(f"--data {data}: split {base!r} not found; its files form {sorted(by_split)}")
            files = [Path(f) for f in by_split[base]]
            source = str(path)
        else:
            source = _FILE_BUILDERS[path.suffix]
        try:
            ds = datasets.load_dataset(source, data_files=None if path.is_dir() else [str(path)],
                                       split=split or "train")
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as e:
            raise unreadable_files(data, files, e) from None
        info = {"loader": f"files:{_FILE_BUILDERS[files[0].suffix]}", "fingerprint": _hash_files(files, path)}
    elif "://" in data:
        ds, info = _load_url(data, split, storage_options)
    elif _looks_like_path(data):
        raise ConfigError(f"--data {data}: no such file or folder")
    else:
        try:
            ds = datasets.load_dataset(data, config_name, split=split or "train", revision=revision,
                                       storage_options=storage_options)
        except Exception as e:  # network, auth, unknown id, offline mode: all mean "cannot load"
            raise ConfigError(f"--data {data}: not a local path, and loading it as a hub dataset failed "
                              f"({e.__class__.__name__}: {e})") from None
        info = {"loader": "hub", "fingerprint": ds._fingerprint}
    if len(ds) == 0:
        raise InvalidDataError(f"--data {data}{f' --split {split}' if split else ''}: no rows")
    if max_rows is not None and max_rows < len(ds):
        ds = ds.select(range(max_rows))
        info["max_rows"] = max_rows
    info = {"source": redact_url(str(data)), "split": split, "config_name": config_name, "num_rows": len(ds), **info}
    if revision is not None:
        info["revision"] = revision
    return ds, info


def _load_streaming(data: str, path: Path, *, split, config_name, revision, storage_options, max_rows):
    """`load_rows(..., streaming=True)`: files through `streaming.stream_rows`, hub ids through datasets."""
    import datasets

    from logitcache.storage.streaming import parse_row_range, stream_rows

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise ConfigError(f"--data {data}: a save_to_disk folder is memory-mapped already; drop --streaming")
    if path.exists() or "://" in data or _looks_like_path(data):
        if not path.exists() and "://" not in data:
            raise ConfigError(f"--data {data}: no such file or folder")
        rows, info = stream_rows(data, split=split, max_rows=max_rows, storage_options=storage_options)
    else:
        base, start, end = parse_row_range(split, max_rows, data=data)
        if end is None:
            raise ConfigError(f"--data {data} --streaming: a streamed hub dataset has no length; give --max-rows N "
                              f"or --split 'train[:N]'")
        try:
            stream = datasets.load_dataset(data, config_name, split=base,
                                           revision=revision, streaming=True, storage_options=storage_options)
            taken = list(stream.skip(start).take(end - start)) if start else list(stream.take(end - start))
        except Exception as e:  # network, auth, unknown id, offline mode: all mean "cannot load"
            raise ConfigError(f"--data {data} --streaming: streaming the hub dataset failed "
                              f"({e.__class__.__name__}: {e})") from None
        if not taken:
            raise InvalidDataError(f"--data {data}: no rows in [{start}:{end}]")
        rows = datasets.Dataset.from_list(taken)
        h = hashlib.sha256(json.dumps([data, config_name, revision, start, end], sort_keys=True).encode())
        for row in taken:  # the rows themselves: a hub id without a pinned revision may change
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
        info = {"loader": "hub:streaming", "fingerprint": h.hexdigest()}
    info = {"source": redact_url(str(data)), "split": split, "config_name": config_name, "num_rows": len(rows), **info}
    if max_rows is not None:
        info["max_rows"] = max_rows
    if revision is not None:
        info["revision"] = revision
    return rows, info


def unreadable_files(data: str, files: list[Path], error: BaseException) -> LogitCacheError:
    """Say which file (and for JSON lines, which line) `datasets` failed on, and why.

    `datasets` reports "An error occurred while generating the dataset" (or a bare StopIteration
    for an empty JSON file, or "Value is too big!"); the cause is found again here, cheaply, by
    reading the files. A ValueError with no such cause (an unknown split) stays a ConfigError."""
    for f in files:
        problem = _file_problem(f)
        if problem:
            return InvalidDataError(f"--data {data}: {f} {problem}")
    if isinstance(error, ValueError):
        return ConfigError(f"--data {data}: {error}")
    cause = error.__cause__ or error.__context__ or error
    return InvalidDataError(f"--data {data}: cannot read the rows ({type(cause).__name__}: {cause}); check that each "
                            f"field has one type in every row")


def _file_problem(f: Path) -> str | None:
    if f.stat().st_size == 0:
        return "is empty (no rows)"
    if f.suffix != ".jsonl":
        return None
    with open(f, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}; each line must be one JSON object"
            for key, value in row.items():
                if isinstance(value, int) and not -(2**63) <= value < 2**63:
                    return f"line {number}: field {key!r}: the number {value} does not fit in 64 bits"
    return None


def _load_url(data: str, split: str | None, storage_options: dict | None):
    """A file or folder of data files behind an fsspec URL; fingerprinted by content like local files."""
    import datasets

    fs, root, files = list_data_files(data, storage_options, suffixes=_FILE_BUILDERS)
    if not files:
        raise ConfigError(f"--data {data}: no {'/'.join(_FILE_BUILDERS)} files found")
    builders = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if len(builders) > 1 or None in builders:
        raise ConfigError(f"--data {data}: expected files of one kind ({', '.join(_FILE_BUILDERS)}); found "
                          f"{sorted(str(b) for b in builders)}")
    # Read through fsspec ourselves: datasets refuses remote URLs in offline mode (HF_HUB_OFFLINE), which
    # a cluster without hub access sets, though the bucket is reachable.
    ds = _read_files(fs, files, builders.pop(), data)
    base, _, rest = (split or "train").partition("[")
    if base != "train":
        raise ConfigError(f"--data {data}: files are one 'train' split; got --split {split}")
    if rest:
        spec = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})[0]
        ds = ds.select(range(spec.from_, spec.to))
    loader = f"files:{_FILE_BUILDERS[Path(files[0]).suffix]}"
    return ds, {"loader": loader, "fingerprint": _hash_files(files, root, fs=fs)}


def _read_files(fs, files: list[str], builder: str, data: str):
    import datasets
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            try:
                if builder == "parquet":
                    tables.append(pq.read_table(fh))
                elif builder == "arrow":
                    tables.append(pa.ipc.open_stream(fh).read_all())
                elif f.endswith(".jsonl"):
                    tables.append(pj.read_json(fh))
                else:  # .json: one JSON array (or JSON lines)
                    text = fh.read().decode()
                    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in
                                                                                     text.splitlines() if x.strip()]
                    tables.append(pa.Table.from_pylist(rows))
            except (pa.ArrowInvalid, ValueError) as e:
                raise ConfigError(f"--data {data}: cannot read {f} as {builder} ({e})") from None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as e:
        raise ConfigError(f"--data {data}: the files' columns do not agree ({e})") from None
    return datasets.Dataset(table)


def _data_files(path: Path, data: str) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        files = [p for p in files if p.suffix in _FILE_BUILDERS]
    if not files:
        raise ConfigError(f"--data {data}: no {'/'.join(_FILE_BUILDERS)} files found")
    unknown = [f for f in files if f.suffix not in _FILE_BUILDERS]
    if unknown:
        raise ConfigError(f"--data {data}: {unknown[0].name} is not one of {', '.join(_FILE_BUILDERS)}")
    builders = {_FILE_BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise ConfigError(f"--data {data}: mixes file kinds {sorted(builders)}; point it at one kind")
    return files


def _hash_files(files: list, root, *, fs=None) -> str:
    """sha256 over each file's path below `root` (its name where `root` is the one file) and content.

    Args:
        files: paths (local, or in `fs`); root: the --data file or folder they came from.
        fs: the fsspec filesystem they live in; None: local files.
    """
    h = hashlib.sha256()
    for f in files:
        content = hashlib.sha256()
        with (open(f, "rb") if fs is None else fs.open(f, "rb")) as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                content.update(block)
        rel = Path(f).name if f == root else Path(f).relative_to(root).as_posix()
        h.update(f"{rel}\0{content.hexdigest()}\n".encode())
    return h.hexdigest()


def _looks_like_path(data: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else (absolute, relative, ~, a file suffix,
    # more than one slash) was meant as a local path.
    return data.startswith((".", "/", "~")) or data.count("/") > 1 or Path(data).suffix in _FILE_BUILDERS
