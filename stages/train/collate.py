"""`Collator`: pad a list of items (see `alignment`) into a batch, and gather the supervised rows.

Batch, for B items padded to length T (right padding):
    input_ids: (B, T) int64, attention_mask: (B, T) int64, labels: (B, T) int64 (-100 at padding).
    Packed (`pack=True`, padding-free): the B items one after another in one row, B = 1 and
    T = the items' total length, by transformers' `DataCollatorWithFlattening`: position_ids
    (1, T) restart at 0 at each item and there is no attention_mask, so transformers' sdpa and
    eager attention build a block-diagonal causal mask from the position_ids (exact: no token
    attends across items) and flash-attention takes the item boundaries from them.
    rows: (N,) int64 index of each supervised row in the flattened (B*T, V) logits: b * T + t for
        every t with labels[b, t + 1] != -100, item after item, t ascending.
    next_ids: (N,) int64 the token each row predicts, labels[b, t + 1] ("targets" is kept for the teacher's).
    With teacher targets (n_b rows per item, N_kd = sum n_b):
    kd_select: (N_kd,) int64 index into `rows` of each teacher row's student row.
    teacher_ids: (N_kd, K) int64, teacher_logprobs: (N_kd, K) float32, tail_mass: (N_kd,) float32,
        [sample_counts: (N_kd, K) int64].
    row_index: (B,) int64 source rows; stream: (B, 3) int64 stream positions (see `data`).
"""

import numpy as np
import torch

from logitcache.stages.train.alignment import IGNORE, supervised_positions

__all__ = ["Collator"]

_TEACHER = ("teacher_ids", "teacher_logprobs", "tail_mass", "sample_counts", "sample_logprobs")


class Collator:
    """Pads items and packs their supervised rows.

    Args:
        pad_id: token id used for padding `input_ids` (masked out by `attention_mask`).
        pad_to_multiple_of: round T up to a multiple (e.g. 8 for tensor cores); not with `pack`.
        pack: put the items in one row without padding (see the module docstring). The batch
            holds the same items and rows in the same order either way, so the data stream, its
            resume position and the loss are unchanged; only the padding's compute goes.
    """

    def __init__(self, pad_id: int, *, pad_to_multiple_of: int | None = None, pack: bool = False):
        self.pad_id, self.multiple, self.pack = int(pad_id), pad_to_multiple_of, bool(pack)
        if self.pack:
            from transformers import DataCollatorWithFlattening

            self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack:
            flat = self._flatten([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items],
                                 return_tensors="np")
            input_ids, labels = flat["input_ids"].astype(np.int64), flat["labels"].astype(np.int64)
            batch = {"position_ids": torch.from_numpy(flat["position_ids"].astype(np.int64))}
            starts = np.cumsum([0] + [len(it["input_ids"]) for it in items])[:-1]
        else:
            b = len(items)
            t = max(len(it["input_ids"]) for it in items)
            if self.multiple:
                t = -(-t // self.multiple) * self.multiple
            input_ids = np.full((b, t), self.pad_id, dtype=np.int64)
            mask = np.zeros((b, t), dtype=np.int64)
            labels = np.full((b, t), IGNORE, dtype=np.int64)
            for i, it in enumerate(items):
                n = len(it["input_ids"])
                input_ids[i, :n], mask[i, :n], labels[i, :n] = it["input_ids"], 1, it["labels"]
            batch = {"attention_mask": torch.from_numpy(mask)}
            starts = np.arange(b) * t
        rows, select, offset = [], [], 0
        for i, it in enumerate(items):
            own = np.asarray(it["labels"], dtype=np.int64)
            pos = supervised_positions(own)
            rows.append(starts[i] + pos)
            if "kd_positions" in it:
                found = np.searchsorted(pos, it["kd_positions"])
                assert np.array_equal(pos[np.minimum(found, max(len(pos) - 1, 0))], it["kd_positions"]), \
                    "a teacher row sits at a position without a label"
                select.append(offset + found)
            offset += len(pos)
        rows = np.concatenate(rows).astype(np.int64)
        flat = labels.reshape(-1)
        batch.update({"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                      "rows": torch.from_numpy(rows), "next_ids": torch.from_numpy(flat[rows + 1]),
                      "row_index": torch.tensor([int(it["row_index"]) for it in items], dtype=torch.int64)})
        if "kd_positions" in items[0]:
            batch["kd_select"] = torch.from_numpy(np.concatenate(select).astype(np.int64))
            for name in _TEACHER:
                if name in items[0]:
                    batch[name] = torch.from_numpy(np.concatenate([it[name] for it in items]))
        if "stream" in items[0]:
            batch["stream"] = torch.from_numpy(np.stack([it["stream"] for it in items]))
        return batch
