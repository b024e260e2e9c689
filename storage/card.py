"""A cache's dataset card (README.md): what a shared logit dataset holds and how to train from it.

    text = dataset_card(index, repo_id="me/qwen-logits", top_k_mass=0.93, schema=shard_schema(fs, root, index))

The YAML header is `huggingface_hub.DatasetCardData`'s (license, source dataset, task category, size
category, tags), and for a Parquet cache its `configs` entry points `datasets.load_dataset(<cache folder or
repo>)` at the shard files only (the index and the per-shard entry files beside them are JSON the dataset
loader must not read). The column table is read from a shard's own Parquet schema, so the card cannot
claim a dtype the shards do not hold. The body gives the teacher, K or N, the encoding, the fingerprint,
the counts, the kept top-K mass, and the command that trains from it.
"""

from __future__ import annotations

import json
import re

from logitcache.storage.encoding import COMPACT_STEP
from logitcache.storage.redact import redact_url

__all__ = ["CARD_NAME", "SHARD_GLOB", "dataset_card", "card_metadata", "shard_schema"]

CARD_NAME = "README.md"
SHARD_GLOB = "shard-*.parquet"

_MEANING = {
    "row_index": "the source row of the dataset",
    "input_ids": "the teacher's tokens of the sequence",
    "positions": "the supervised positions t (the teacher predicted token t+1 there)",
    "topk_ids": "per position, the teacher's token ids (-1 = padding)",
    "topk_logprobs": "their log-probabilities at temperature 1; {decode}",
    "target_logprob": "log-probability of the actual next token",
    "tail_mass": "teacher probability outside the stored ids",
    "sample_counts": "how often each id was drawn",
    "sample_logz": "log sum of p^(1/T) over the vocabulary, T the sampling temperature",
}
# The Hub's size_categories bins, by number of rows (sequences).
_SIZES = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (1e7, "1M<n<10M"),
          (1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"), (1e11, "10B<n<100B"), (1e12, "100B<n<1T")]


def shard_schema(fs, root: str, index: dict):
    """The Parquet schema of the cache's first shard (its footer only), or None for a non-Parquet cache."""
    if index["backend"] != "arrow" or not index["shards"]:
        return None
    import pyarrow.parquet as pq

    from logitcache.storage.paths import safe_join

    with fs.open(safe_join(root, index["shards"][0]["name"]), "rb") as f:
        return pq.read_schema(f)


def _type_name(t) -> str:
    """A Parquet column's type as the card writes it: `list<list<int16>>`."""
    import numpy as np
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return np.dtype(t.to_pandas_dtype()).name  # float16, not arrow's "halffloat"


def _source_dataset(dataset: dict) -> str | None:
    """The Hub id of the source dataset, when it was loaded from the Hub."""
    source = str(dataset.get("source") or "")
    m = re.match(r"^hf://datasets/([^/@]+/[^/@]+)", source)
    if m:
        return m.group(1)
    return source if dataset.get("loader") == "hub" and re.match(r"^[\w.-]+(/[\w.-]+)?$", source) else None


def card_metadata(index: dict, *, license: str | None = None):
    """The card's YAML header as `huggingface_hub.DatasetCardData`."""
    from huggingface_hub import DatasetCardData

    rows = index["counts"]["sequences"]
    source = _source_dataset(index.get("dataset", {}))
    teacher = index["teacher"].get("name_or_path")
    configs = ([{"config_name": "default", "data_files": [{"split": "train", "path": SHARD_GLOB}]}]
               if index["backend"] == "arrow" else None)
    return DatasetCardData(
        license=license, source_datasets=[source] if source else None, task_categories=["text-generation"],
        size_categories=[next((name for limit, name in _SIZES if rows < limit), "n>1T")],
        tags=["logitcache", "distillation", "knowledge-distillation", "logits"], configs=configs,
        pretty_name=f"Teacher logits of {teacher}", teacher_model=teacher)


def dataset_card(index: dict, *, repo_id: str | None = None, top_k_mass: float | None = None, schema=None,
                 license: str | None = None) -> str:
    """The README.md of a finished cache.

    Args:
        index: the cache's validated index.
        repo_id: the dataset repo it is pushed to (for the training command), if any.
        top_k_mass: mean probability the stored ids hold (1 - mean tail_mass), if measured.
        schema: a shard's `pyarrow.Schema` (`shard_schema`): the column table's source; None: no table.
        license: the Hub's license id (the teacher's and the dataset's terms decide it), if given.
    """
    sp, enc, counts = index["sparsification"], index["encoding"]["name"], index["counts"]
    teacher = index["teacher"].get("name_or_path")
    parquet = index["backend"] == "arrow"
    header = ["---", card_metadata(index, license=license).to_yaml(), "---"]
    what = (f"the top-{sp['k']} next-token log-probabilities" if sp["mode"] == "topk" else
            f"{sp.get('num_samples', sp['k'])} sampled next-token ids per position (RS-KD, temperature "
            f"{sp.get('temperature')}), with their counts and log-probabilities")
    decode = {"lossless": "float32, as computed",
              "float16": "float16",
              "compact": f"int16 deltas along K: logprob = -cumsum(stored, axis=-1) * {COMPACT_STEP}"}[enc]
    source = f"hf://datasets/{repo_id}" if repo_id else "<this folder or its URL>"
    lines = [
        *header, "", f"# Teacher logits of {teacher}", "",
        f"A logitcache cache: {what} of **{teacher}** over "
        f"{redact_url(str(index['dataset'].get('source')))} ({index['inputs'].get('kind')} inputs, supervision: "
        f"{index['inputs'].get('supervision', 'see inputs')}).", "",
        "| | |", "|---|---|",
        f"| teacher | `{teacher}` (revision `{index['teacher'].get('revision')}`) |",
        f"| mode | {sp['mode']}, {'K' if sp['mode'] == 'topk' else 'N'} = {sp['k']} |",
        f"| encoding | {enc} |",
        f"| fingerprint | `{index['fingerprint']}` |",
        f"| tokenizer | {index['tokenizer']['vocab_size']} ids, logits {index['tokenizer']['logits_width']} wide, "
        f"fingerprint `{index['tokenizer']['fingerprint'][:16]}` |",
        f"| sequences / tokens / positions | {counts['sequences']} / {counts['tokens']} / {counts['positions']} |",
        f"| skipped / truncated rows | {counts.get('skipped', 0)} / {counts.get('truncated', 0)} |",
    ]
    if top_k_mass is not None:
        lines.append(f"| mean probability in the stored ids | {top_k_mass:.4f} |")
    lines += ["", "## Train a student from it", "", "```bash",
              f"logitcache train --cache {source} --student <student sharing the teacher's vocabulary> \\",
              "    --loss kl --out ./student --max-steps 1000", "```", "",
              "A student with another vocabulary trains with `--loss uld` (it re-tokenizes the stored text).", ""]
    if parquet and schema is not None:
        lines += ["## Columns", "", "One Parquet file per shard, one row per sequence "
                  "(`datasets.load_dataset` reads them as the `train` split); types as the shards hold them:", "",
                  "| column | type | meaning |", "|---|---|---|"]
        for field in schema:
            meaning = _MEANING.get(field.name, f"the {field.name} text the tokens cover"
                                   f"{' (JSON)' if field.name == 'messages' else ''}"
                                   if _type_name(field.type) == "string" else "see logitcache's docs/FORMAT.md")
            lines.append(f"| `{field.name}` | {_type_name(field.type)} | {meaning.format(decode=decode)} |")
        lines.append("")
    lines += ["## Index", "", f"`index.json` holds the full description; its inputs section:", "", "```json",
              json.dumps(index["inputs"], indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)
