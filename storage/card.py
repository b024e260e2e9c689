"""A cache's dataset card (README.md): what a shared logit dataset holds and how to train from it.

    text = dataset_card(index, repo_id="me/qwen-logits", top_k_mass=0.93)

The YAML header makes a Parquet cache folder a valid Hugging Face dataset on its own: its `configs`
entry points `datasets.load_dataset(<cache folder or repo>)` at the shard files only (the index and
the per-shard entry files beside them are JSON the dataset loader must not read). The body gives the
teacher, K or N, the encoding, the fingerprint, the counts, the kept top-K mass, how each column
decodes, and the command that trains from it.
"""

from __future__ import annotations

import json

from logitcache.storage.encoding import COMPACT_STEP, TAIL_MASS_DTYPE
from logitcache.storage.redact import redact_url

__all__ = ["CARD_NAME", "dataset_card"]

CARD_NAME = "README.md"

_COLUMNS = """\
| column | type | meaning |
|---|---|---|
| `row_index` | int64 | the source row of the dataset |
| `input_ids` | list<int32> | the teacher's tokens of the sequence |
| `positions` | list<int32> | the supervised positions t (the teacher predicted token t+1 there) |
| `topk_ids` | list<list<int32>[K]> | per position, the teacher's token ids (-1 = padding) |
| `topk_logprobs` | list<list<{lp}>[K]> | their log-probabilities at temperature 1; {decode} |
| `target_logprob` | list<{scalar}> | log-probability of the actual next token |
| `tail_mass` | list<{tail}> | teacher probability outside the stored ids |
"""


def dataset_card(index: dict, *, repo_id: str | None = None, top_k_mass: float | None = None) -> str:
    """The README.md of a finished cache.

    Args:
        index: the cache's validated index.
        repo_id: the dataset repo it is pushed to (for the training command), if any.
        top_k_mass: mean probability the stored ids hold (1 - mean tail_mass), if measured.
    """
    sp, enc, counts = index["sparsification"], index["encoding"]["name"], index["counts"]
    teacher = index["teacher"].get("name_or_path")
    parquet = index["backend"] == "arrow"
    header = ["---", "tags:", "- logitcache", "- distillation", "- logits"]
    if parquet:
        header += ["configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: shard-*.parquet"]
    header.append("---")
    what = (f"the top-{sp['k']} next-token log-probabilities" if sp["mode"] == "topk" else
            f"{sp.get('num_samples', sp['k'])} sampled next-token ids per position (RS-KD, temperature "
            f"{sp.get('temperature')}), with their counts and log-probabilities")
    decode = {"lossless": "float32, as computed",
              "float16": "float16",
              "compact": f"int16 deltas along K: logprob = -cumsum(stored, axis=-1) * {COMPACT_STEP}"}[enc]
    lp = {"lossless": "float32", "float16": "float16", "compact": "int16"}[enc]
    scalar = "float32" if enc == "lossless" else "float16"
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
    if parquet:
        lines += ["## Columns", "", "One Parquet file per shard, one row per sequence "
                  "(`datasets.load_dataset` reads them as the `train` split):", "",
                  _COLUMNS.format(lp=lp, scalar=scalar, tail=TAIL_MASS_DTYPE.name, decode=decode).rstrip()]
        if sp["mode"] == "sample":
            lines.append("| `sample_counts` | list<list<uint16>[K]> | how often each id was drawn |")
        for field in index.get("text_fields", []):
            lines.append(f"| `{field}` | string | the {field} text the tokens cover"
                         f"{' (JSON)' if field == 'messages' else ''} |")
        lines.append("")
    lines += ["## Index", "", f"`index.json` holds the full description; its inputs section:", "", "```json",
              json.dumps(index["inputs"], indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)
