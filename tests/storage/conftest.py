"""Fixtures for the storage tests: tiny finished caches built from synthetic targets."""

import numpy as np
import pytest
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import CacheWriter, ShardData


@pytest.fixture
def build_cache(tmp_path):
    """Factory: write a finished cache; returns (path, list of the sequences written)."""

    def build(backend: str, *, encoding: str = "lossless", k: int = 8, shards: int = 3, per_shard: int = 4,
              sample: bool = False, seed: int = 0, root=None):
        rng = np.random.default_rng(seed)
        root = root or str(tmp_path / f"cache-{backend}-{encoding}-{k}-{sample}")
        writer = CacheWriter(root, backend=backend, encoding=encoding, vocab_size=VOCAB,
                             fingerprint="fp-test", text_fields=TEXT_FIELDS)
        written = []
        for j in range(shards):
            seqs = [make_sequence(rng, j * per_shard + i, int(rng.integers(4, 40)), k, sample=sample)
                    for i in range(per_shard)]
            writer.write_shard(j, ShardData.from_sequences(seqs, text_fields=TEXT_FIELDS),
                               extra={"rows": [j * per_shard, (j + 1) * per_shard]})
            written += seqs
        writer.finalize(metadata(k, "sample" if sample else "topk"), counts={"skipped": 1})
        return root, written

    return build
