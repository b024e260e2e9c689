"""Stage one on Ray: a Ray Data pipeline over shard ids, one teacher engine per actor.

    logitcache precompute ... --ray                        # a local Ray cluster on this machine
    logitcache precompute ... --ray-address auto           # the running cluster (`ray start --head`)

The dataset is the list of shard ids still to write; `map_batches` hands them one at a time to
a pool of `ShardWorker` actors (one GPU each where the cluster has GPUs, else one CPU). Each
actor gets the driver's `JobSettings` (DATA's revision and the storage options, i.e. endpoint and
credentials, included), loads the tokenizer and DATA itself, checks both against the driver's,
and calls the same `make_shard` as the single-process loop: rows are tokenized by the same code
in the actor, the engine gets token ids, and the shard is written with the same `CacheWriter`
(atomic; resume skips it). The driver only collects entries and finalizes. A killed actor or
driver leaves no visible partial shard; a rerun picks up the missing ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from logitcache.stages.precompute.settings import JobSettings
from logitcache.storage import errors
from logitcache.storage.errors import ConfigError, LogitCacheError

__all__ = ["run_on_ray", "ShardWorker"]


class ShardWorker:
    """A Ray Data actor holding one teacher engine; each call writes the shards in its batch.

    Args:
        settings: the job's settings, the same value the driver's local loop would use.
    """

    def __init__(self, settings: JobSettings):
        # Our errors travel back as data: Ray would wrap them beyond recognition.
        self.settings, self.error = settings, None
        try:
            self._setup(settings)
        except LogitCacheError as e:
            self.error = e

    def _setup(self, settings: JobSettings) -> None:
        from transformers import AutoTokenizer

        from logitcache.stages.precompute.data import RowEncoder, load_rows
        from logitcache.stages.precompute.plan import writer_from_record
        from logitcache.storage import tokenizer_fingerprint

        o = settings.options
        tokenizer = AutoTokenizer.from_pretrained(o.teacher, revision=o.revision, trust_remote_code=o.trust_remote_code)
        self.dataset, info = load_rows(o.data, split=o.split, config_name=o.data_config, revision=o.data_revision,
                                       storage_options=o.storage_options, streaming=o.streaming, max_rows=o.max_rows)
        # A node with another copy of the data or tokenizer would write a different cache.
        got = {"dataset": info, "tokenizer": tokenizer_fingerprint(tokenizer)}
        for name, expected in settings.expected.items():
            if got[name] != expected:
                raise ConfigError(f"Ray worker: its {name} ({_short(got[name])}) differs from the driver's "
                                  f"({_short(expected)}); every node must see the same {name}")
        self.encoder = RowEncoder(tokenizer, settings.inputs)
        self.engine = settings.start_engine()
        if self.engine.logits_width != settings.logits_width:
            raise ConfigError(f"Ray worker: engine logits width {self.engine.logits_width} != {settings.logits_width}")
        self.writer = writer_from_record(o.out, settings.record, storage_options=o.storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from logitcache.stages.precompute.shard_work import make_shard

        s, targets, entries = self.settings.options, self.settings.targets, []
        for shard_id in batch["shard_id"]:
            try:
                if self.error is not None:
                    raise self.error
                shard, extra = make_shard(int(shard_id), dataset=self.dataset, encoder=self.encoder,
                                          engine=self.engine, text_fields=self.writer.text_fields,
                                          rows_per_shard=s.rows_per_shard, strict=s.strict, targets=targets,
                                          batch_size=s.batch_size)
                entry = self.writer.write_shard(int(shard_id), shard, extra=extra)
            except LogitCacheError as e:
                entry = {"error": {"type": type(e).__name__, "message": str(e)}}
            entries.append(json.dumps(entry))
        return {"shard_id": np.asarray(batch["shard_id"]), "entry": np.array(entries, dtype=object)}


def _short(value) -> str:
    return value[:12] if isinstance(value, str) else json.dumps(value, sort_keys=True)


def run_on_ray(todo: list[int], *, settings: JobSettings, address: str | None, actors: int | None,
               on_shard: Callable[[int, dict], None], should_stop: Callable[[], bool]) -> dict[int, dict]:
    """Write shards `todo` on a Ray cluster. Returns {shard id: entry} of the shards written, in completion order.

    Args:
        todo: shard ids to write.
        settings: the job's settings; each actor gets a copy.
        address: a Ray cluster address; None joins the cluster already initialized in this process,
            else starts a local one.
        actors: engine actors; default one per GPU of the cluster, or 1 on a cluster without GPUs.
        on_shard: called with (shard id, entry) as each shard is written.
        should_stop: polled between shards; True stops the run (in-flight shards are abandoned).
    """
    import ray

    if settings.options.engine.running is not None:
        raise ConfigError("a started engine cannot go to Ray actors; give the engine by name (each actor starts one)")
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
        results = shards.map_batches(ShardWorker, fn_constructor_kwargs={"settings": settings}, batch_size=1,
                                     concurrency=min(actors, len(todo)), **resources)
        written = {}
        for row in results.iter_rows():
            shard_id, entry = int(row["shard_id"]), json.loads(row["entry"])
            if "error" in entry:
                raise getattr(errors, entry["error"]["type"])(entry["error"]["message"])
            written[shard_id] = entry
            on_shard(shard_id, entry)
            if should_stop():
                break
        return written
    finally:
        if started:
            ray.shutdown()

