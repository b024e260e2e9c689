"""What a cache keeps per position: one value, from the command line to the engines and the index.

`Targets.resolve` applies the defaults of --top-k / --samples / --temperature once; the engines,
the shard loop and the index read the resolved value.
"""

from __future__ import annotations

from dataclasses import dataclass

from logitcache.stages.precompute.sparsify import SAMPLE_FIELDS, TOPK_FIELDS
from logitcache.storage.errors import ConfigError

__all__ = ["Targets", "MODES", "DEFAULT_TOP_K", "DEFAULT_SAMPLES"]

MODES = ("topk", "sample")
DEFAULT_TOP_K, DEFAULT_SAMPLES = 32, 64
_MAX_SAMPLES = 65535  # counts are stored as uint16


@dataclass(frozen=True)
class Targets:
    """What to keep per position.

    Attributes:
        mode: "topk" (the `width` most likely ids) or "sample" (RS-KD: the distinct ids of `width` draws).
        width: K in topk mode, N (draws) in sample mode.
        temperature: the sampling temperature (sample mode). Top-K log-probs are always at temperature 1
            (a student applies its own), so topk mode refuses any other value rather than ignore it.
        seed: the sample-mode seed (each sequence's is derived from it and its row).
    """

    mode: str = "topk"
    width: int = DEFAULT_TOP_K
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; expected one of {MODES}")
        if self.mode == "topk" and not (isinstance(self.width, int) and self.width >= 1):
            raise ConfigError(f"k={self.width!r} must be an integer >= 1")
        if self.mode == "sample" and not (isinstance(self.width, int) and 1 <= self.width <= _MAX_SAMPLES):
            raise ConfigError(f"num_samples={self.width!r} must be an integer between 1 and {_MAX_SAMPLES}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.mode == "topk" and self.temperature != 1.0:
            raise ConfigError(
                f"temperature={self.temperature} in topk mode: top-K log-probs are stored at temperature 1; "
                "temperature applies to sample mode only"
            )

    @classmethod
    def resolve(cls, *, mode: str, top_k: int | None, samples: int | None, temperature: float | None,
                seed: int) -> "Targets":
        """The CLI's options, checked, with their defaults applied (K 32, N 64, temperature 1).

        Raises:
            ConfigError: an option of the other mode, or a width that is not a positive integer.
        """
        if mode not in MODES:
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

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of an engine's result arrays (`sparsify`)."""
        return TOPK_FIELDS if self.mode == "topk" else SAMPLE_FIELDS

    def describe(self) -> dict:
        """The index's `sparsification` section (and its fingerprint part)."""
        out = {"mode": self.mode, "k": self.width, "temperature": self.temperature}
        if self.mode == "sample":
            # sample_logz: each row stores its draw distribution's normaliser (docs/FORMAT.md).
            out.update(num_samples=self.width, seed=self.seed, sample_logz=True)
        return out
