"""Stage one's settings as values: the run's options, which engine, and one job's whole setup.

`PrecomputeSettings` is every option of a run (`logitcache precompute --help`), written once: the CLI,
`pipeline.api` and `precompute()` take it, and its `check()` holds the rules between options that need
nothing loaded (`--print-config` runs it). `EngineSpec` is which engine to start and with what options;
`EngineSpec.start` is the one call that turns a name into a running engine (the local loop and every
Ray actor use it). `JobSettings` is everything a worker needs to make this job's shards, the same value
for the local loop and each Ray actor (picklable, so Ray ships it as is).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from logitcache.stages.precompute.data import InputSpec
from logitcache.stages.precompute.engines import Engine, build_engine, default_engine_name
from logitcache.stages.precompute.plan import owned_shards
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError
from logitcache.storage.redact import is_credential_key

__all__ = ["PrecomputeSettings", "EngineSpec", "JobSettings"]


@dataclass(frozen=True)
class EngineSpec:
    """Which teacher engine to run, and how.

    Attributes:
        name: "hf" or "vllm"; None: vLLM where vLLM and a GPU are present, else hf (see `resolved`).
        dtype: teacher compute dtype ("auto", "float32", "bfloat16", "float16").
        max_batch_tokens: token budget per forward pass, or None for the engine's default.
        options: engine-specific options (`--engine-arg`), e.g. {"vllm_path": "logprobs"}.
        running: an engine already started with these settings, which `start` returns and
            `close` leaves open (tests share one expensive engine across runs). It stays in
            this process: a Ray job refuses it.
    """

    name: str | None = None
    dtype: str = "auto"
    max_batch_tokens: int | None = None
    options: dict = field(default_factory=dict)
    running: Engine | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, engine: Engine, **kwargs) -> "EngineSpec":
        """The spec of an engine the caller started (and will close)."""
        return cls(name=engine.name, running=engine, **kwargs)

    def resolved(self) -> "EngineSpec":
        """This spec with its name decided (the running engine's, the given one, or the default)."""
        if self.running is not None:
            if self.name not in (None, self.running.name):
                raise ConfigError(f"engine {self.name!r} was asked for, but the engine given is {self.running.name!r}")
            return replace(self, name=self.running.name)
        return self if self.name is not None else replace(self, name=default_engine_name())

    def describe(self) -> dict:
        """The index's `engine` section (and its fingerprint part); an option holding a credential
        (vLLM's `hf_token`) is left out: the index is shared, and a token says nothing of the targets."""
        options = {k: v for k, v in self.options.items() if not is_credential_key(k)}
        return {"name": self.name, "dtype": self.dtype, "options": options}

    def start(self, teacher: str, targets: Targets, *, revision: str | None, trust_remote_code: bool) -> Engine:
        """The running engine: the one given, or a new one (the only place a name becomes an engine)."""
        if self.running is not None:
            return self.running
        return build_engine(self.name, teacher, mode=targets.mode, k=targets.width, num_samples=targets.width,
                            temperature=targets.temperature, dtype=self.dtype, max_batch_tokens=self.max_batch_tokens,
                            trust_remote_code=trust_remote_code, revision=revision, **self.options)

    def close(self, engine: Engine) -> None:
        """Close `engine` if `start` started it."""
        if engine is not self.running:
            engine.close()


@dataclass(frozen=True)
class PrecomputeSettings:
    """Every option of a run: the CLI's (`logitcache precompute --help`), in snake_case.

    `engine` says which engine runs the teacher and how (`EngineSpec("hf")`; default: vLLM where vLLM
    and a GPU are present, else hf); `EngineSpec.of(engine)` hands over an engine already started, which
    is used and left open (tests share one). `backend` is "arrow" (Parquet, the default) or "zarr".
    `verify` checks the sha256 of this job's shards already written (default: their sizes only).
    `chat_template` is a template file's path or URL; `chat_template_kwargs` its variables.
    """

    teacher: str
    data: str
    out: str
    engine: EngineSpec = field(default_factory=EngineSpec)
    backend: str = "arrow"
    encoding: str = "lossless"
    mode: str = "topk"
    top_k: int | None = None
    samples: int | None = None
    temperature: float | None = None
    seed: int = 0
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    tools_field: str | None = None
    prompt_format: str = "plain"
    split: str | None = None
    data_config: str | None = None
    data_revision: str | None = None
    max_length: int | None = None
    batch_size: int = 64
    rows_per_shard: int = 1000
    num_jobs: int = 1
    job_index: int = 0
    strict: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    ray: bool = False
    ray_address: str | None = None
    ray_actors: int | None = None
    progress: bool = True
    storage_options: dict | None = None  # fsspec options for DATA and the cache (endpoint, credentials)
    streaming: bool = False
    max_rows: int | None = None
    verify: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None

    def check(self) -> Targets:
        """Refuse options that cannot run together, before anything is loaded; return the targets.

        Raises:
            ConfigError: naming the options.
        """
        targets = self.targets()
        for name, value in (("--batch-size", self.batch_size), ("--rows-per-shard", self.rows_per_shard)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        owned_shards(1, self.num_jobs, self.job_index)  # --job-index against --num-jobs
        return targets

    def targets(self) -> Targets:
        """What to keep per position, defaults applied (`Targets.resolve`)."""
        return Targets.resolve(mode=self.mode, top_k=self.top_k, samples=self.samples,
                               temperature=self.temperature, seed=self.seed)


@dataclass(frozen=True)
class JobSettings:
    """Everything a worker needs to make and write this job's shards.

    The local loop and each Ray actor get the same value, so a shard's bytes do not depend on
    which of them made it. Plain values only (picklable): Ray ships it to the actors as is.

    Attributes:
        options: the run's options, its engine resolved (`EngineSpec.resolved`).
        record: the job record (`plan.write_job_record`): fingerprint, backend, encoding, layout.
        inputs: how a row becomes tokens and supervised positions.
        targets: what to keep per position.
        expected: the driver's dataset info and tokenizer fingerprint; an actor that loads other
            data or another tokenizer refuses to write.
    """

    options: PrecomputeSettings
    record: dict
    inputs: InputSpec
    targets: Targets
    expected: dict

    @property
    def logits_width(self) -> int:
        return self.record["logits_width"]

    def start_engine(self) -> Engine:
        """The job's engine (`EngineSpec.start`)."""
        o = self.options
        return o.engine.start(o.teacher, self.targets, revision=o.revision, trust_remote_code=o.trust_remote_code)
