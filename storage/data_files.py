"""The files of `--data`, a file or a folder, local or behind an fsspec URL: one listing for the
loader (`rows`) and for `--streaming` (`streaming`), each of which imports it.

    fs, root, files = list_data_files("s3://bucket/corpus/", {"endpoint_url": "http://..."}, suffixes={".jsonl"})
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from logitcache.storage.errors import ConfigError

__all__ = ["list_data_files"]


def list_data_files(data: str, storage_options: dict | None, *,
                    suffixes=None) -> tuple[object, str, list[str]]:
    """The files of `--data`, a file or a folder, local or behind an fsspec URL; hidden paths skipped.

    Args:
        data: the --data value (a local path is made absolute); messages name it as given.
        storage_options: options for the URL's fsspec filesystem.
        suffixes: keep only a folder's files with one of these suffixes (None: all of them); a single
            file is returned whatever its suffix, for the caller to judge.

    Returns:
        (fs, root, files): the fsspec filesystem, the path in it without a trailing slash, and the
        files as sorted paths in it (`[root]` for a single file; possibly empty for a folder).

    Raises:
        ConfigError: no such file or folder, or it cannot be read (the cause named).
    """
    from logitcache.storage.paths import resolve

    url = data if "://" in data else os.path.abspath(os.path.expanduser(data))
    try:
        fs, root = resolve(url, storage_options)  # with the network bounds (connect/read timeouts, attempts)
        if fs.isdir(root):
            files = sorted(f for f in fs.find(root) if (suffixes is None or PurePosixPath(f).suffix in suffixes)
                           and not any(part.startswith(".") for part in PurePosixPath(f).relative_to(root).parts))
        elif fs.exists(root):
            files = [root]
        else:
            raise ConfigError(f"--data {data}: no such file or folder")
    except ConfigError:
        raise
    except Exception as e:  # unreachable endpoint, bad credentials, unknown protocol: say where
        raise ConfigError(f"--data {data}: cannot read ({e.__class__.__name__}: {e})") from None
    return fs, root, files
