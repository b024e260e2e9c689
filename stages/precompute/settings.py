"""Stage one's settings as values: what to keep per position, which engine, and one job's whole setup.

`Targets.resolve` applies the defaults of --top-k / --samples / --temperature once; everything
after reads the resolved values. `EngineSpec` is which engine to start and with what options;
`EngineSpec.start` is the one call that turns a name into a running engine (the local loop and
every Ray actor use it). `JobSettings` is everything a worker needs to make this job's shards,
the same value for the local loop and each Ray actor (picklable, so Ray ships it as is).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from logitcache.stages.precompute.data import InputSpec
from logitcache.stages.precompute.engines import Engine, build_engine, default_engine_name
from logitcache.storage.errors import ConfigError
from logitcache.storage.redact import is_credential_key

__all__ = ["Targets", "EngineSpec", "JobSettings", "DEFAULT_TOP_K", "DEFAULT_SAMPLES"]

DEFAULT_TOP_K, DEFAULT_SAMPLES = 32, 64


@dataclass(frozen=True)
class Targets:
    """What a cache keeps per position.

    Attributes:
        mode: "topk" (the `width` most likely ids) or "sample" (RS-KD: distinct ids of `width` draws).
        width: K in topk mode, N (draws) in sample mode.
        temperature: the sampling temperature (sample mode); 1.0 in topk mode.
        seed: the sample-mode seed (each sequence's is derived from it and its row).
    """

    mode: str
    width: int
    temperature: float = 1.0
    seed: int = 0

    @classmethod
    def resolve(cls, *, mode: str, top_k: int | None, samples: int | None, temperature: float | None,
                seed: int) -> "Targets":
        """The CLI's options, checked, with their defaults applied (K 32, N 64, temperature 1).

        Raises:
            ConfigError: an option of the other mode, or a width that is not a positive integer.
        """
        if mode not in ("topk", "sample"):
            raise ConfigError(f"--mode {mode!r}: expected 'topk' or 'sample'")
        if mode == "topk":
            if samples is not None or temperature not in (None, 1.0):
                raise ConfigError("--samples and --temperature belong to --mode sample; top-K log-probs are "
                                  "stored at temperature 1")
            width, name, temperature = (DEFAULT_TOP_K if top_k is None else top_k), "--top-k", 1.0
        else:
            if top_k is not None:
                raise ConfigError("--top-k belongs to --mode topk; sample mode keeps the distinct ids of --samples "
                                  "draws")
            width, name = (DEFAULT_SAMPLES if samples is None else samples), "--samples"
            temperature = 1.0 if temperature is None else temperature
        if not (isinstance(width, int) and width >= 1):
            raise ConfigError(f"{name} must be a positive integer, got {width!r}")
        return cls(mode=mode, width=width, temperature=float(temperature), seed=seed)

    def describe(self) -> dict:
        """The index's `sparsification` section (and its fingerprint part)."""
        out = {"mode": self.mode, "k": self.width, "temperature": self.temperature}
        if self.mode == "sample":
            # sample_logz: each row stores its draw distribution's normaliser (docs/FORMAT.md).
            out.update(num_samples=self.width, seed=self.seed, sample_logz=True)
        return out

    def engine_kwargs(self) -> dict:
        """`build_engine`'s target arguments."""
        if self.mode == "topk":
            return {"mode": "topk", "k": self.width}
        return {"mode": "sample", "num_samples": self.width, "temperature": self.temperature}


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
        return build_engine(self.name, teacher, dtype=self.dtype, max_batch_tokens=self.max_batch_tokens,
                            trust_remote_code=trust_remote_code, revision=revision, **targets.engine_kwargs(),
                            **self.options)

    def close(self, engine: Engine) -> None:
        """Close `engine` if `start` started it."""
        if engine is not self.running:
            engine.close()


@dataclass(frozen=True)
class JobSettings:
    """Everything a worker needs to make and write this job's shards.

    The local loop and each Ray actor get the same value, so a shard's bytes do not depend on
    which of them made it. Plain values only (picklable): Ray ships it to the actors as is.

    Attributes:
        teacher, revision, trust_remote_code: the teacher model (and its tokenizer).
        data, split, data_config, data_revision, streaming, max_rows: DATA, as `load_rows` takes them.
        storage_options: fsspec options (endpoint, credentials) for DATA and the cache.
        out: the cache location.
        record: the job record (`plan.write_job_record`): fingerprint, backend, encoding, layout.
        inputs: how a row becomes tokens and supervised positions.
        engine: which engine to start.
        targets: what to keep per position.
        rows_per_shard: source rows per storage shard.
        batch_size: sequences per engine call.
        strict: stop at the first row that would be skipped.
        expected: the driver's dataset info and tokenizer fingerprint; an actor that loads other
            data or another tokenizer refuses to write.
    """

    teacher: str
    revision: str | None
    trust_remote_code: bool
    data: str
    split: str | None
    data_config: str | None
    data_revision: str | None
    storage_options: dict | None
    streaming: bool
    max_rows: int | None
    out: str
    record: dict
    inputs: InputSpec
    engine: EngineSpec
    targets: Targets
    rows_per_shard: int
    batch_size: int
    strict: bool
    expected: dict

    @property
    def logits_width(self) -> int:
        return self.record["logits_width"]
