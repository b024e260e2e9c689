"""A finished cache's dataset card: a Parquet cache folder is a dataset repo on its own.

    .venv/bin/python -m pytest tests/storage/test_card.py -q      # ~10 s
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import CacheWriter, ShardData, open_cache
from logitcache.storage.card import CARD_NAME, dataset_card, shard_schema


def write_cache(root, backend: str, encoding: str = "compact", mode: str = "topk"):
    rng = np.random.default_rng(0)
    writer = CacheWriter(str(root), backend=backend, encoding=encoding, vocab_size=VOCAB, fingerprint="fp-card",
                         text_fields=TEXT_FIELDS)
    for j in range(2):
        seqs = [make_sequence(rng, 3 * j + i, 12, 4, sample=mode == "sample") for i in range(3)]
        writer.write_shard(j, ShardData.from_sequences(seqs, text_fields=TEXT_FIELDS), extra={"rows": [3 * j, 3 * j + 3]})
    return writer.finalize(metadata(4, mode=mode), num_shards=2)


def test_parquet_cache_folder_loads_with_datasets_load_dataset(tmp_path):
    index = write_cache(tmp_path / "cache", "arrow")
    ds = datasets.load_dataset(str(tmp_path / "cache"), split="train")
    assert ds.num_rows == index["counts"]["sequences"] == 6
    assert set(ds.column_names) >= {"row_index", "input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass",
                                    "prompt", "response"}
    cache = open_cache(str(tmp_path / "cache"))
    by_row = {s["row_index"]: s for s in cache}
    for row in ds:  # the card's decode rule for compact log-probs reproduces logitcache's own reader
        stored = np.asarray(row["topk_logprobs"], dtype=np.int64)
        np.testing.assert_allclose(-np.cumsum(stored, axis=-1) / 32.0, by_row[row["row_index"]]["topk_logprobs"])
    card = (tmp_path / "cache" / CARD_NAME).read_text()
    assert "logprob = -cumsum(stored, axis=-1) * 0.03125" in card and "fp-card" in card


@pytest.mark.parametrize("backend, mode", [("zarr", "topk"), ("arrow", "sample")])
def test_card_names_teacher_k_encoding_fingerprint_counts_and_training(tmp_path, backend, mode):
    index = write_cache(tmp_path / "c", backend, encoding="lossless", mode=mode)
    fs = open_cache(str(tmp_path / "c")).fs
    card = dataset_card(index, repo_id="me/tiny-logits", top_k_mass=0.9321, schema=shard_schema(fs, str(tmp_path / "c"), index))
    assert "tiny-teacher" in card and "fp-card" in card and "lossless" in card
    assert f"{mode}, {'K' if mode == 'topk' else 'N'} = 4" in card and "| 6 / " in card and "0.9321" in card
    assert "logitcache train --cache hf://datasets/me/tiny-logits" in card
    assert ("configs:" in card) == (backend == "arrow") and ("sample_counts" in card) == (mode == "sample")
