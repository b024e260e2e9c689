"""One declaration per loss: what the CLI, the refusals, the trainer and `--help` know about it.

A loss is a per-chunk function (its *row function*, see `fused.KDRows`) plus one `Loss` entry in
`LOSSES` below. Everything else reads the entry: `logitcache train --loss` takes its choices and
help from it, `checks` refuses a cache mode the loss does not read or a student of another
tokenizer when the loss needs the teacher's, `loss_settings` validates options against it and
takes the default CE/KD weights from it, and `functions` builds the public callable (`kl(...)`,
`bild(...)`) from it. See docs/LOSSES.md for a worked example of adding one.

This module imports neither torch nor the row functions (they are named as "module:function"
and imported on first use), so `logitcache --help` stays fast.
"""

import importlib
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from logitcache.storage.errors import ConfigError

__all__ = ["Option", "Loss", "LOSSES", "get", "names", "kd_names", "TOPK", "SAMPLE"]

TOPK, SAMPLE = "topk", "sample"


@dataclass(frozen=True)
class Option:
    """One keyword option of a loss.

    Attributes:
        name: the keyword (`--loss-option NAME=VALUE`; temperature, tail and top_k also have flags).
        default: used when the option is not given.
        help: one line for `--help` and the docs.
        low, high: the allowed range of a number; `low_open`/`high_open`: whether the ends are excluded.
        choices: the allowed values of a string option.
        integer: the value must be an int.
    """

    name: str
    default: Any
    help: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = True
    high_open: bool = True
    choices: tuple[str, ...] | None = None
    integer: bool = False

    def check(self, loss: str, value: Any) -> Any:
        """Returns `value` if it is allowed; ConfigError naming the loss, the option and the range otherwise."""
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{loss}: {self.name}={value!r} is not one of {', '.join(map(repr, self.choices))}")
            return value
        if self.integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{loss}: {self.name}={value!r} must be an integer")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{loss}: {self.name}={value!r} must be a number")
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if not (above and below):
            raise ConfigError(f"{loss}: {self.name}={value} must lie in {self.range()}")
        return value

    def range(self) -> str:
        if self.choices is not None:
            return " | ".join(self.choices)
        if self.integer and self.high == math.inf:
            return f"integer >= {self.low + 1 if self.low_open else self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Loss:
    """The declaration of one loss.

    Attributes:
        name: `--loss NAME`.
        rows: "module:function" of its row function in this package, e.g. "divergences:kl_rows"
            (imported on first use, so `--help` stays light), or the row function itself (a loss
            declared outside this package); None for sft, which has no teacher term.
        help: one line for `--help`.
        options: its keyword options, with defaults and ranges.
        modes: the cache modes it reads: "topk" (sorted top-K ids) and/or "sample" (sampled ids
            with counts).
        needs_teacher_tokenizer: it reads teacher ids as student ids, so a student of another
            tokenizer is refused. True unless the loss says otherwise.
        ce_weight, kd_weight: the default weights of total = ce_weight * CE + kd_weight * KD.
        batch_inputs: per-row tensors the trainer passes from the batch, {keyword: batch key}.
        optional_inputs: the same, for fields a cache may lack (older caches); the loss gets None.
        approximates: one line: what it stands for on the full vocabulary, and how well the cache
            reaches it (docs/LOSSES.md has the numbers).
    """

    name: str
    rows: str | Callable | None
    help: str
    options: tuple[Option, ...] = ()
    modes: frozenset[str] = frozenset({TOPK})
    needs_teacher_tokenizer: bool = True
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    batch_inputs: dict[str, str] = field(default_factory=dict)
    optional_inputs: dict[str, str] = field(default_factory=dict)
    approximates: str = ""

    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def inputs(self) -> dict[str, str]:
        """Every per-row batch input, required and optional: {keyword: batch key}."""
        return {**self.batch_inputs, **self.optional_inputs}

    def resolve(self, given: dict) -> dict:
        """The options with defaults filled in and every value checked.

        Raises:
            ConfigError: an option the loss does not take, or a value out of its range.
        """
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"loss {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                              f"it takes {', '.join(sorted(known)) or 'none'}")
        return {name: o.check(self.name, given.get(name, o.default)) for name, o in known.items()}

    def row_function(self):
        """The row function, imported on first use."""
        if self.rows is None:
            raise ConfigError(f"loss {self.name!r} has no teacher term")
        if callable(self.rows):
            return self.rows
        module, function = self.rows.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)

    def describe(self) -> str:
        """`--help`'s line: name, help, options with defaults."""
        opts = ", ".join(f"{o.name}={o.default}" for o in self.options)
        extra = [] if self.needs_teacher_tokenizer else ["any tokenizer"]
        if self.rows is not None and self.modes != {TOPK}:
            extra.append("/".join(sorted(self.modes)) + " caches")
        if (self.ce_weight, self.kd_weight) != (1.0, 1.0):
            extra.append(f"ce {self.ce_weight:g} + kd {self.kd_weight:g}")
        tail = f" [{'; '.join(extra)}]" if extra else ""
        return f"{self.name}: {self.help}" + (f" ({opts})" if opts else "") + tail


def _temperature(default: float, help: str = "softmax temperature T of both sides") -> Option:
    return Option("temperature", default, help, low=0.0)


_SKEW = Option("alpha", 0.1, "skew, 0 <= alpha < 1", low=0.0, high=1.0, low_open=False)  # DistiLLM's skl, srkl
_TAIL = Option("tail", "bucket", "the teacher mass outside the cache: one extra class, or renormalized away",
               choices=("bucket", "renorm"))
_DIVERGENCE_MODES = frozenset({TOPK, SAMPLE})

LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("sft", None, "cross entropy on the labels alone; no teacher", modes=frozenset(), kd_weight=0.0,
         needs_teacher_tokenizer=False, approximates="-"),
    Loss("kl", "divergences:kl_rows", "forward KL(teacher || student)",
         (_temperature(1.0), _TAIL), modes=_DIVERGENCE_MODES,
         approximates="full-vocabulary forward KL; exact at T = 1 with tail=bucket (the K+1 grouped classes)"),
    Loss("rkl", "divergences:rkl_rows", "reverse KL(student || teacher)",
         (_temperature(1.0), _TAIL), modes=_DIVERGENCE_MODES,
         approximates="full-vocabulary reverse KL over the K+1 grouped classes"),
    Loss("jsd", "divergences:jsd_rows", "GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024)",
         (Option("beta", 0.5, "mixture weight of the teacher, 0 < beta < 1", low=0.0, high=1.0),
          _temperature(1.0), _TAIL), modes=_DIVERGENCE_MODES,
         approximates="full-vocabulary JSD(beta) over the K+1 grouped classes"),
    Loss("skl", "divergences:skl_rows", "DistiLLM's skew KL(P || a P + (1 - a) Q) (Ko et al. 2024)",
         (_SKEW, _temperature(1.0), _TAIL), modes=_DIVERGENCE_MODES,
         approximates="full-vocabulary skew KL over the K+1 grouped classes"),
    Loss("srkl", "divergences:srkl_rows", "DistiLLM's skew reverse KL(Q || (1 - a) P + a Q)",
         (_SKEW, _temperature(1.0), _TAIL), modes=_DIVERGENCE_MODES,
         approximates="full-vocabulary skew reverse KL over the K+1 grouped classes"),
    Loss("topk_kl", "divergences:topk_kl_rows", "KL with both sides renormalized over the cached ids",
         (_temperature(1.0),),
         approximates="itself (the usual top-K baseline); not full KL unless the cache holds the vocabulary"),
    Loss("dkd", "decoupled:dkd_rows", "Decoupled KD (Zhao et al. 2022), over the cached ids, times T^2",
         (Option("alpha", 1.0, "TCKD weight (mdistiller's CIFAR config; it also sets T = 4)", low=0.0,
                 low_open=False),
          Option("beta", 8.0, "NCKD weight (mdistiller's CIFAR config)", low=0.0, low_open=False),
          _temperature(1.0)),
         approximates="DKD over the cached ids as classes, target = teacher top-1"),
    Loss("nkd", "decoupled:nkd_rows", "Normalized KD (Yang et al. 2023), over the cached ids",
         (Option("gamma", 1.5, "weight of the non-target term (the NKD paper's setting)", low=0.0, low_open=False),
          _temperature(1.0, "lambda, the non-target temperature (its term is times lambda^2)")),
         approximates="NKD over the cached ids as classes, target = teacher top-1"),
    Loss("normkd", "decoupled:normkd_rows", "NormKD (Chi et al. 2023): per-row temperature from the logits' std",
         (Option("t_norm", 1.5, "T = t_norm * std(logits over the cached ids)", low=0.0),),
         approximates="NormKD over the cached ids as classes"),
    Loss("bild", "bild_loss:bild_rows", "BiLD (Li et al. 2024): teacher-led + student-led top-k logit differences",
         (Option("top_k", 8, "k, the logits compared in each half (<= the cache's K)", low=2, low_open=False,
                 integer=True),
          _temperature(3.0, "T of the pairwise differences (the paper's 3.0)")),
         # Not the paper's 0: on the full demo preset, BiLD alone tripled held-out perplexity and ECE against
         # SFT; with 0.5 x label CE it beats SFT on accuracy, perplexity and matches its ECE (README).
         ce_weight=0.5,
         approximates="BiLD on full logits; teacher-led half exact, student-led half estimated past rank K"),
    # Top-K caches only: sorted sampled ids are not the teacher's top ranks (at student = teacher the
    # loss would be 0.26, not 0, on a 64-draw cache).
    Loss("uld", "uld_loss:uld_rows", "Universal Logit Distillation (Boizard et al. 2024): L1 of sorted probabilities",
         needs_teacher_tokenizer=False, kd_weight=1.5,
         approximates="ULD on full logits, with the tail compared as one mass"),
    Loss("rskd", "rskd_loss:rskd_rows", "Random-sampling KD (Anshumann et al. 2025) from a sample-mode cache",
         (_temperature(1.0, "T: trains softmax(student / T) toward softmax(teacher / T)"),
          Option("sample_temperature", 1.0, "the temperature stage one drew at (the trainer reads it from the "
                 "cache index)", low=0.0)),
         modes=frozenset({SAMPLE}), batch_inputs={"counts": "sample_counts"},
         optional_inputs={"draw_logprobs": "sample_logprobs"},
         approximates="cross entropy to softmax(teacher / T): unbiased at T = 1 (any sampling temperature, "
                      "caches with sample_logz) and at T = the sampling temperature; self-normalised, so "
                      "consistent but biased at finite N, at other T"),
)}


def get(name: str) -> Loss:
    """The declaration of loss `name`; ConfigError naming the valid ones if there is none."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}") from None


def names() -> tuple[str, ...]:
    return tuple(LOSSES)


def kd_names() -> tuple[str, ...]:
    """The losses with a teacher term (every one but sft), in declaration order."""
    return tuple(name for name, spec in LOSSES.items() if spec.rows is not None)
