"""Stage one on Ray: a Ray Data pipeline over shard ids, one teacher engine per actor.

    logitcache precompute ... --ray                        # a local Ray cluster on this machine
    logitcache precompute ... --ray-address auto           # the running cluster (`ray start --head`)

The dataset is the list of shard ids still to write; `map_batches` hands them one at a time to
a pool of `ShardWorker` actors (one GPU each where the cluster has GPUs, else one CPU). Each
actor loads the tokenizer and DATA itself, checks both against the driver's fingerprints, and
calls the same `process_shard` as the single-process loop: rows are tokenized by the same code
in the actor, the engine gets token ids, and the shard is written with the same `CacheWriter`
(atomic; resume skips it). The driver only collects entries and finalizes. A killed actor or
driver leaves no visible partial shard; a rerun picks up the missing ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from logitcache.storage import errors
from logitcache.storage.errors import ConfigError, LogitCacheError

__all__ = ["run_on_ray", "ShardWorker"]


class ShardWorker:
    """A Ray Data actor holding one teacher engine; each call writes the shards in its batch.

    Args:
        setup: plain values from the driver (see `run.py`): teacher, data, input spec, engine
            name and arguments, the job record, the fingerprints to check against.
    """

    def __init__(self, setup: dict):
        # Our errors travel back as data: Ray would wrap them beyond recognition.
        self.error = None
        try:
            self._setup(setup)
        except LogitCacheError as e:
            self.error = e

    def _setup(self, setup: dict) -> None:
        from transformers import AutoTokenizer

        from logitcache.stages.precompute.data import RowEncoder, load_rows
        from logitcache.stages.precompute.engines import build_engine
        from logitcache.stages.precompute.plan import writer_from_record
        from logitcache.storage import tokenizer_fingerprint

        tokenizer = AutoTokenizer.from_pretrained(setup["teacher"], revision=setup["revision"],
                                                  trust_remote_code=setup["trust_remote_code"])
        self.dataset, info = load_rows(setup["data"], split=setup["split"], config_name=setup["data_config"])
        # A node with another copy of the data or tokenizer would write a different cache.
        got = {"dataset": info["fingerprint"], "tokenizer": tokenizer_fingerprint(tokenizer)}
        for name, expected in setup["expected"].items():
            if got[name] != expected:
                raise ConfigError(f"Ray worker: its {name} fingerprint {got[name][:12]} differs from the driver's "
                                  f"{expected[:12]}; every node must see the same {name}")
        self.encoder = RowEncoder(tokenizer, setup["spec"])
        self.engine = build_engine(setup["engine_name"], setup["teacher"], **setup["engine_kwargs"])
        if self.engine.logits_width != setup["logits_width"]:
            raise ConfigError(f"Ray worker: engine logits width {self.engine.logits_width} != {setup['logits_width']}")
        self.writer = writer_from_record(setup["out"], setup["writer_record"], storage_options=setup["storage_options"])
        self.shard_kwargs = setup["shard_kwargs"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from logitcache.stages.precompute.shard_work import process_shard

        entries = []
        for shard_id in batch["shard_id"]:
            try:
                if self.error is not None:
                    raise self.error
                entry = process_shard(int(shard_id), dataset=self.dataset, encoder=self.encoder, engine=self.engine,
                                      writer=self.writer, **self.shard_kwargs)
            except LogitCacheError as e:
                entry = {"error": {"type": type(e).__name__, "message": str(e)}}
            entries.append(json.dumps(entry))
        return {"shard_id": np.asarray(batch["shard_id"]), "entry": np.array(entries, dtype=object)}


def run_on_ray(todo: list[int], *, actor_setup: dict, address: str | None, actors: int | None,
               on_shard: Callable[[int, dict], None], should_stop: Callable[[], bool]) -> list[int]:
    """Write shards `todo` on a Ray cluster. Returns the shard ids written, in completion order.

    Args:
        todo: shard ids to write.
        actor_setup: `ShardWorker`'s argument.
        address: a Ray cluster address; None joins the cluster already initialized in this process,
            else starts a local one.
        actors: engine actors; default one per GPU of the cluster, or 1 on a cluster without GPUs.
        on_shard: called with (shard id, entry) as each shard is written.
        should_stop: polled between shards; True stops the run (in-flight shards are abandoned).
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=True)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = actors or max(gpus, 1)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar counts positions
        shards = ray.data.from_items([{"shard_id": s} for s in todo], override_num_blocks=len(todo))
        results = shards.map_batches(ShardWorker, fn_constructor_kwargs={"setup": actor_setup}, batch_size=1,
                                     concurrency=min(actors, len(todo)), **resources)
        written = []
        for row in results.iter_rows():
            shard_id, entry = int(row["shard_id"]), json.loads(row["entry"])
            if "error" in entry:
                raise getattr(errors, entry["error"]["type"])(entry["error"]["message"])
            written.append(shard_id)
            on_shard(shard_id, entry)
            if should_stop():
                break
        return written
    finally:
        if started:
            ray.shutdown()

