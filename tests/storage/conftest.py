"""Fixtures for the storage tests: tiny finished caches built from synthetic targets."""

import pytest

from logitcache.storage.testing import write_synthetic_cache


@pytest.fixture
def build_cache(tmp_path):
    """Factory: write a finished cache; returns (path, list of the sequences written)."""

    def build(backend: str, *, encoding: str = "lossless", k: int = 8, shards: int = 3, per_shard: int = 4,
              sample: bool = False, seed: int = 0, root=None):
        root = root or str(tmp_path / f"cache-{backend}-{encoding}-{k}-{sample}")
        return root, write_synthetic_cache(root, backend, encoding=encoding, k=k, shards=shards,
                                           per_shard=per_shard, sample=sample, seed=seed)

    return build
