"""The accelerate patch: `IterableDatasetShard` made a pass-through around a stream split by rank.

Fails loudly if accelerate changes the attributes or the behaviour the patch relies on.

    .venv/bin/python -m pytest tests/stages/train/test_trainer_patch.py -x -q
"""

import pytest
import torch
from accelerate.data_loader import IterableDatasetShard

from logitcache.stages.train.trainer import pass_through


class Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10))


def test_unpatched_shard_keeps_one_batch_in_world_size():
    """The yardstick: what accelerate does without the patch (rank 1 of 2, batches of 2)."""
    shard = IterableDatasetShard(Numbers(), batch_size=2, num_processes=2, process_index=1, drop_last=True)
    assert list(shard) == [2, 3, 6, 7]


def test_patched_shard_yields_every_item_in_order():
    shard = IterableDatasetShard(Numbers(), batch_size=2, num_processes=2, process_index=1, drop_last=True)
    pass_through(shard)
    assert list(shard) == list(range(10))


def test_a_shard_without_the_attributes_fails_loudly():
    class Renamed:
        dataset = Numbers()

    with pytest.raises(RuntimeError, match="needs updating"):
        pass_through(Renamed())
