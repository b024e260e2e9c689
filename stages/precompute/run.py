"""Stage one: run a teacher once over a dataset and write the logit cache.

    logitcache precompute --teacher Qwen/Qwen2.5-7B-Instruct --data train.jsonl --messages-field messages \\
        --out ./cache --top-k 32
    # CPU, a tiny model (see logitcache.pipeline.scratch):
    logitcache precompute --teacher /tmp/tiny --data /tmp/text.jsonl --text-field text --out /tmp/cache --engine hf

From Python: `precompute(PrecomputeSettings(teacher=..., data=..., out=..., text_field="text"))`, or
`logitcache.pipeline.api.precompute(...)` with the same names.

The recipe, top to bottom (`precompute`; steps 2.-5. are `_open_job`, then `_plan`, `_work`, `_finalize`):
  1. settings: `PrecomputeSettings.check` (the targets, top-K or RS-KD samples, defaults applied once) and
     the engine's name.
  2. teacher: config (identity hash, logits width, context length) and tokenizer.
  3. dataset: load DATA (or, with --streaming, plan its slice to read shard by shard), pick the input kind,
     build the row encoder.
  4. fingerprint: chained over dataset, teacher, tokenizer, inputs, sparsification, engine and
     format version; plus the index metadata. A rerun with other settings is refused.
  5. cache: the writer and `job.json` (what `logitcache merge` needs).
  6. plan: shard s = rows [s*R, (s+1)*R); this job owns s % num_jobs == job_index; shards whose
     entry exists and whose stored size matches it are skipped (resume); missing or truncated ones
     (with --verify: any whose sha256 differs) are rewritten, in a finished cache too, whose index
     is then written again. The entries are read here once and carried on.
  7. work: each remaining shard is encoded, run through the engine in batches and written
     atomically, locally or on Ray actors, both from one `JobSettings`. SIGTERM/SIGINT: the
     shard in flight is discarded (or finished, if it is being written), and the run stops.
  8. finalize: once every shard exists, the index is written; until then the cache is unfinished
     and unreadable, so no reader can see a partial cache or shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field, replace

from logitcache.stages.precompute.data import InputSpec, RowEncoder, load_rows
from logitcache.stages.precompute.plan import (finalize_cache, num_shards, owned_shards,
                                               write_job_record)
from logitcache.stages.precompute.settings import EngineSpec, JobSettings, PrecomputeSettings
from logitcache.stages.precompute.targets import Targets
from logitcache.stages.precompute.shard_work import ShardWriterThread, make_shard
from logitcache.storage import (FORMAT_VERSION, CacheWriter, chain_fingerprint, layout, read_index, resolve,
                               tokenizer_fingerprint)
from logitcache.storage.errors import ConfigError
from logitcache.storage.fingerprint import tokenizer_identity, weights_digest
from logitcache.storage.inputs import ChatOptions
from logitcache.storage.lease import hold_lease
from logitcache.storage.redact import redact_text

__all__ = ["precompute", "PrecomputeSettings", "PrecomputeResult", "FINGERPRINT_PARTS", "EngineSpec"]

# The order of the fingerprint chain; changing it changes every fingerprint.
FINGERPRINT_PARTS = ("dataset", "teacher", "tokenizer", "inputs", "sparsification", "engine", "format")


@dataclass
class PrecomputeResult:
    """What a run did.

    Attributes:
        out: the cache location.
        fingerprint: the cache's fingerprint.
        num_shards: storage shards of the whole cache.
        owned: shard ids this job is responsible for.
        written: shard ids written by this run.
        finished: the index exists (this run or an earlier one finalized the cache).
        stopped_by: the signal name if a signal stopped the run early, else None.
        index: the index when finished.
    """

    out: str
    fingerprint: str
    num_shards: int
    owned: list[int]
    written: list[int] = field(default_factory=list)
    finished: bool = False
    stopped_by: str | None = None
    index: dict | None = None


def precompute(settings: PrecomputeSettings) -> PrecomputeResult:
    """Fill (part of) a cache; finalize it when every shard exists. See the module docstring.

    Raises:
        ConfigError: bad or conflicting settings, an unknown DATA, or a cache begun with other settings.
        InvalidDataError: with `strict`, the first row that would be skipped.
    """
    # 1. Settings: defaults applied once, here.
    targets = settings.check()
    s = replace(settings, engine=settings.engine.resolved())
    # One writer per job of a cache: a second run of this job is refused before any work.
    where = resolve(s.out, s.storage_options)
    with hold_lease(*where, str(s.out), name=layout.lease_name(s.num_jobs, s.job_index)) as lease:
        job = _open_job(s, targets)  # 2.-5.
        result = PrecomputeResult(out=str(s.out), fingerprint=job.settings.record["fingerprint"],
                                  num_shards=job.total, owned=job.owned)
        todo, done = _plan(job, result)
        if result.finished:
            return result
        if todo:
            done.update(_work(todo, job, result))
            if result.stopped_by:
                return result
        _finalize(done, job, lease, result)
        return result


@dataclass
class _Job:
    """What steps 2.-5. decided: the job's settings, its rows and how they become tokens, its writer."""

    settings: JobSettings
    dataset: object
    encoder: RowEncoder
    writer: CacheWriter
    total: int
    owned: list[int]
    max_length: int


def _open_job(s: PrecomputeSettings, targets: Targets) -> _Job:
    """Steps 2.-5.: the teacher, the dataset, the fingerprint, the writer and the job record."""
    from transformers import AutoTokenizer

    # 2. Teacher: identity, logits width, context length; tokenizer.
    teacher_info, logits_width, context = _teacher_identity(s.teacher, s.revision, s.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(s.teacher, revision=s.revision, trust_remote_code=s.trust_remote_code)
    max_length = s.max_length if s.max_length is not None else context or _tokenizer_limit(tokenizer)

    # 3. Dataset and input kind.
    dataset, dataset_info = load_rows(s.data, split=s.split, config_name=s.data_config, revision=s.data_revision,
                                      storage_options=s.storage_options, streaming=s.streaming, max_rows=s.max_rows)
    spec = InputSpec.build(text_field=s.text_field, prompt_field=s.prompt_field, response_field=s.response_field,
                           messages_field=s.messages_field, tools_field=s.tools_field, prompt_format=s.prompt_format,
                           max_length=max_length, chat=ChatOptions.load(s.chat_template, s.chat_template_kwargs,
                                                                        storage_options=s.storage_options))
    absent = [c for c in spec.columns.values() if c not in dataset.column_names]
    if absent:
        raise ConfigError(f"--data {s.data}: column(s) {absent} not found; it has {dataset.column_names}")

    # 4. Fingerprint and index metadata.
    tok_fp = tokenizer_fingerprint(tokenizer)
    parts = {
        "dataset": {key: dataset_info[key] for key in ("fingerprint", "split", "config_name", "num_rows")},
        "teacher": {key: teacher_info[key] for key in ("name_or_path", "revision", "config_hash", "weights_digest")},
        "tokenizer": tok_fp,
        "inputs": {**spec.describe(), "rows_per_shard": s.rows_per_shard},
        "sparsification": targets.describe(),
        "engine": s.engine.describe(),
        "format": {"format_version": FORMAT_VERSION},
    }
    fingerprint = chain_fingerprint(*(parts[name] for name in FINGERPRINT_PARTS))
    metadata = {
        "teacher": teacher_info,
        "tokenizer": {**tokenizer_identity(tokenizer), "logits_width": logits_width},
        "dataset": dataset_info,
        "inputs": parts["inputs"],
        "sparsification": parts["sparsification"],
        "engine": parts["engine"],
    }

    # 5. Cache writer and job record.
    total = num_shards(len(dataset), s.rows_per_shard)
    writer = CacheWriter(s.out, backend=s.backend, encoding=s.encoding, vocab_size=logits_width,
                         fingerprint=fingerprint, text_fields=spec.stored_fields, storage_options=s.storage_options)
    record = {"fingerprint": fingerprint, "fingerprint_parts": parts, "backend": s.backend, "encoding": s.encoding,
              "logits_width": logits_width, "text_fields": list(spec.stored_fields), "num_shards": total,
              "rows_per_shard": s.rows_per_shard, "metadata": metadata}
    write_job_record(writer, record)
    settings = JobSettings(options=s, record=record, inputs=spec, targets=targets,
                           expected={"dataset": dataset_info, "tokenizer": tok_fp})
    return _Job(settings, dataset, RowEncoder(tokenizer, spec), writer, total,
                owned_shards(total, s.num_jobs, s.job_index), max_length)


def _plan(job: _Job, result: PrecomputeResult) -> tuple[list[int], dict[int, dict]]:
    """Step 6.: (this job's shards to write, {shard id: entry} of the intact ones).

    A shard is to write when it is not written yet, or no longer intact (missing, another size than its
    entry records, or with `verify` another sha256). A finished cache is checked the same way and
    repaired in place; one with nothing to repair sets `result.finished`. The entries are read here once.
    """
    s, writer, owned = job.settings.options, job.writer, job.owned
    finished = writer.is_finished()
    entries = writer.shard_entries()
    damaged = writer.damaged_shards(entries, verify=set(owned) if s.verify else ())
    done = {i: e for i, e in entries.items() if i not in damaged}
    todo = [i for i in owned if i not in done]
    for i in damaged:
        who = "this job rewrites it" if i in owned else "its job must rewrite it"
        _say(f"{s.out}: {entries[i]['name']} is {damaged[i]}; {who}")
    if finished and not todo:
        result.finished, result.index = True, read_index(writer.fs, writer.root)
        _say(f"{s.out}: already finished ({job.total} shards, fingerprint {result.fingerprint[:12]}); this job's "
             f"{len(owned)} shard(s) are intact "
             f"({'sha256 checked' if s.verify else 'sizes checked; --verify checks sha256'}); nothing to do")
        return todo, done
    writer.remove_stale_temporaries(todo)
    _say(f"{s.out}: {job.total} shard(s) of {s.rows_per_shard} rows; this job owns {len(owned)}, "
         f"{len(owned) - len(todo)} already written, {len(todo)} to do")
    return todo, done


def _work(todo: list[int], job: _Job, result: PrecomputeResult) -> dict[int, dict]:
    """Step 7.: write shards `todo`, here or on Ray; returns {shard id: entry} of those written. A signal
    stops it between shards (`result.stopped_by`)."""
    s = job.settings.options
    rows = s.rows_per_shard
    bar = _Progress(sum(min(rows, len(job.dataset) - i * rows) for i in todo), enabled=s.progress)
    with _StopSignals() as stop:
        if s.ray or s.ray_address:
            from logitcache.stages.precompute.ray_job import run_on_ray

            written = run_on_ray(todo, settings=job.settings, address=s.ray_address, actors=s.ray_actors,
                                 on_shard=bar.remote_shard_done, should_stop=stop.is_set)
        else:
            written = _write_locally(todo, job, bar=bar, should_stop=stop.is_set)
    bar.close()
    result.written = list(written)
    if stop.signum is not None:
        result.stopped_by = signal.Signals(stop.signum).name
        _say(f"{s.out}: stopped by {result.stopped_by} after writing {len(result.written)} shard(s) in this run; "
             f"the shard in flight was discarded and nothing partial is visible. Rerun the same command to resume.")
    return written


def _finalize(done: dict[int, dict], job: _Job, lease, result: PrecomputeResult) -> None:
    """Step 8.: write the index once every shard of every job exists. Other jobs may have written theirs
    while this one ran: only then is the list read again."""
    out, total = result.out, job.total
    if len(done) < total:
        done = job.writer.finished_shards()
    if len(done) < total:
        _say(f"{out}: this job is done; {total - len(done)} shard(s) of other jobs are still missing. When all "
             f"jobs have finished, run `logitcache merge {out}`.")
        return
    lease.check()
    result.index = finalize_cache(job.writer, job.settings.record, done=done)
    result.finished = True
    counts = result.index["counts"]
    reasons = ", ".join(f"{key[8:]} {n}" for key, n in counts.items() if key.startswith("skipped_") and n)
    _say(f"{out}: finished: {counts['sequences']} sequences, {counts['positions']} positions, "
         f"{counts['skipped']} row(s) skipped{f' ({reasons})' if reasons else ''}, {counts['truncated']} "
         f"truncated to {job.max_length} tokens (fingerprint {result.fingerprint[:12]})")


def _write_locally(todo: list[int], job: _Job, *, bar: "_Progress", should_stop) -> dict[int, dict]:
    """Write shards `todo` in this process. Returns {shard id: entry} of those written, in order.

    Shard s is compressed, checksummed and written on a thread while shard s+1 is computed (the
    write releases the GIL in zstd and file I/O). At most one shard waits: memory stays at two shards.
    """
    settings, s = job.settings, job.settings.options
    engine = settings.start_engine()
    try:
        if engine.logits_width != settings.logits_width:
            raise ConfigError(f"engine {s.engine.name} reports logits width {engine.logits_width}, the config of "
                              f"{s.teacher} says {settings.logits_width}")
        with ShardWriterThread(job.writer, on_written=bar.shard_done) as writes:
            for shard_id in todo:
                made = make_shard(shard_id, dataset=job.dataset, encoder=job.encoder, engine=engine,
                                  text_fields=job.writer.text_fields, rows_per_shard=s.rows_per_shard,
                                  strict=s.strict, targets=settings.targets, batch_size=s.batch_size,
                                  on_batch=bar.update, should_stop=should_stop)
                if made is None:
                    break
                writes.submit(shard_id, *made)
                if should_stop():
                    break
        return writes.written
    finally:
        s.engine.close(engine)


def _teacher_identity(teacher: str, revision: str | None, trust_remote_code: bool) -> tuple[dict, int, int | None]:
    """(index `teacher` section, logits width, context length or None) from the teacher's config."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    try:
        config = AutoConfig.from_pretrained(teacher, revision=revision, trust_remote_code=trust_remote_code)
        path = cached_file(teacher, "config.json", revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--teacher {teacher}: cannot load its config ({e})") from None
    with open(path) as f:
        raw = json.load(f)
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash"):
        raw.pop(volatile, None)
    config_hash = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # The weights next to config.json (a local folder, or the hub cache's snapshot): changed weights under
    # the same name are another teacher, so they start another cache instead of resuming this one.
    info = {"name_or_path": teacher, "revision": revision, "config_hash": config_hash,
            "weights_digest": weights_digest(os.path.dirname(path)),
            "model_type": getattr(config, "model_type", None), "trust_remote_code": trust_remote_code}
    return info, int(text.vocab_size), getattr(text, "max_position_embeddings", None)


def _tokenizer_limit(tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 2 <= limit < 10_000_000:
        return limit
    raise ConfigError("the teacher's config gives no context length; pass --max-length")


def _say(message: str) -> None:
    print(f"precompute: {redact_text(message)}", file=sys.stderr, flush=True)


class _Progress:
    """A tqdm bar in positions, with an ETA from the positions per row seen so far."""

    def __init__(self, rows_total: int, *, enabled: bool):
        from tqdm.auto import tqdm

        self.rows_total, self.rows, self.positions, self.shards = rows_total, 0, 0, 0
        self.bar = tqdm(total=None, unit="pos", unit_scale=True, desc="precompute", disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def update(self, rows: int, positions: int) -> None:
        self.rows += rows
        self.positions += positions
        if self.rows:
            self.bar.total = int(self.positions + (self.rows_total - self.rows) * self.positions / self.rows)
        self.bar.update(positions)

    def shard_done(self, shard_id: int, entry: dict) -> None:
        self.shards += 1
        self.bar.set_postfix_str(f"rows {self.rows}/{self.rows_total}, shards written {self.shards}", refresh=False)

    def remote_shard_done(self, shard_id: int, entry: dict) -> None:
        """A shard written elsewhere (a Ray actor): count its rows and positions at once."""
        self.update(entry["rows"][1] - entry["rows"][0], entry["positions"])
        self.shard_done(shard_id, entry)

    def close(self) -> None:
        self.bar.close()


class _StopSignals:
    """SIGTERM and SIGINT set a flag that the shard loop polls, instead of killing the process.

    A second SIGINT interrupts at once. Only installed in the main thread (Python's rule).
    (`stages/train/stop.py` has its twin: stages may not import each other, and how to stop, between
    shards or after an optimizer step, is no part of the cache format that `storage/` owns.)
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def is_set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        _say(f"got {signal.Signals(signum).name}: finishing or discarding the shard in flight, then stopping")
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
