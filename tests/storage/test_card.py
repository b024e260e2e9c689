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


@pytest.mark.parametrize("encoding, mode", [("lossless", "topk"), ("compact", "topk"), ("float16", "sample")])
def test_card_parses_as_a_dataset_card_and_its_types_are_the_shards(tmp_path, encoding, mode):
    """huggingface_hub's DatasetCard parses the header back into DatasetCardData; datasets' own check of the
    `configs` accepts it; every column type the card names is the one pyarrow reads from the shard (it once
    said tail_mass float16 where shards hold float32)."""
    import pyarrow.parquet as pq
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    root = tmp_path / "c"
    index = write_cache(root, "arrow", encoding=encoding, mode=mode)
    index["dataset"] = {"source": "HuggingFaceFW/fineweb-edu", "loader": "hub"}
    schema = pq.read_schema(root / index["shards"][0]["name"])
    card = DatasetCard(dataset_card(index, schema=schema, license="apache-2.0"))
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["source_datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert data["task_categories"] == ["text-generation"] and data["size_categories"] == ["n<1K"]
    assert {"logitcache", "distillation"} <= set(data["tags"]) and data["teacher_model"] == "tiny-teacher"
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert configs == {"default": {"data_files": [{"split": "train", "path": "shard-*.parquet"}]}}
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in card.text.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(schema.names)
    for field in schema:  # e.g. tail_mass: list<float32>; compact topk_logprobs: list<list<int16>>
        t, depth = field.type, 0
        while hasattr(t, "value_type"):
            t, depth = t.value_type, depth + 1
        leaf = "string" if str(t) in ("string", "large_string") else np.dtype(t.to_pandas_dtype()).name
        assert rows[field.name] == "list<" * depth + leaf + ">" * depth, field.name
    assert rows["tail_mass"] == "list<float32>"


def test_zarr_card_has_no_configs_and_a_hub_id_only_from_the_hub():
    """A Zarr cache's card points datasets at nothing it cannot read; a local --data is no source dataset."""
    from huggingface_hub import DatasetCard

    from logitcache.storage.card import card_metadata

    index = {"backend": "zarr", "counts": {"sequences": 12_000}, "teacher": {"name_or_path": "t"},
             "dataset": {"source": "data/train", "loader": "files:json"}}
    data = card_metadata(index).to_dict()
    assert "configs" not in data and "source_datasets" not in data and data["size_categories"] == ["10K<n<100K"]
    index["dataset"] = {"source": "hf://datasets/org/set@v1/train.jsonl", "loader": "files:json"}
    assert card_metadata(index).to_dict()["source_datasets"] == ["org/set"]
    assert DatasetCard(f"---\n{card_metadata(index).to_yaml()}\n---\n").data.to_dict() == card_metadata(index).to_dict()
