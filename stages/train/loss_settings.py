"""A run's loss, decided once: `loss_settings` turns the loss's name and flags into a frozen `LossPlan`.

Everything is read from the loss's declaration (`losses.registry`): the options it takes and their
ranges, and its default weights. The name is looked up here, once; the trainer, the batch loss, the
fused head, evaluation and the refusals take the plan.

    plan = loss_settings("bild", top_k=8)
    plan.loss.name, plan.options["top_k"], plan.keep_k, plan.ce_weight, plan.kd_weight   # "bild", 8, None, 0.5, 1.0
    plan = plan.reading(sample_temperature=0.7)   # a sample-mode cache's draw temperature, from its index
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from logitcache.stages.train.losses import registry
from logitcache.storage.errors import ConfigError

__all__ = ["LossPlan", "loss_settings", "loss_weights"]


@dataclass(frozen=True)
class LossPlan:
    """One run's loss: what the loss terms compute, fixed before step one.

    Attributes:
        loss: the loss's declaration (`registry.Loss`).
        options: every option of the loss, checked, defaults filled in; the sampling temperature
            among them is the cache's (`reading`).
        given: the options as given (the run's record in logitcache_train.json).
        top_k: `--top-k` as given (None: not given): BiLD's k for a loss that takes `top_k`,
            otherwise `keep_k`; either way no more than the cache's K.
        keep_k: keep the teacher's first k of the K cached ids (the rest joins the tail mass), or None.
        ce_weight, kd_weight: total = ce_weight * CE + kd_weight * KD.
        sample_temperature: the temperature a sample-mode cache was drawn at (None: not read).
    """

    loss: registry.Loss
    options: dict
    given: dict
    top_k: int | None
    keep_k: int | None
    ce_weight: float
    kd_weight: float
    sample_temperature: float | None = None

    @property
    def name(self) -> str:
        return self.loss.name

    @property
    def distills(self) -> bool:
        """The loss has a teacher term (every loss but sft)."""
        return self.loss.rows is not None

    def reading(self, sample_temperature: float | None) -> LossPlan:
        """This plan fed by caches drawn at `sample_temperature` (a fact of the cache, from its index)."""
        if sample_temperature is None or "sample_temperature" not in self.options:
            return self
        temperature = float(sample_temperature)
        return dataclasses.replace(self, sample_temperature=temperature,
                                   options={**self.options, "sample_temperature": temperature})

    def weighted(self, ce_weight: float, kd_weight: float) -> LossPlan:
        """The same loss at other weights (evaluation's KD term alone, a chunk's share of a batch)."""
        return dataclasses.replace(self, ce_weight=ce_weight, kd_weight=kd_weight)

    def record(self) -> dict:
        """The plan as logitcache_train.json's "loss" records it."""
        options = dict(self.given)
        if self.sample_temperature is not None:
            options["sample_temperature"] = self.sample_temperature
        return {"name": self.name, "options": options, "keep_k": self.keep_k, "ce_weight": self.ce_weight,
                "kd_weight": self.kd_weight}


def loss_settings(loss: str, *, temperature: float | None = None, top_k: int | None = None, tail: str | None = None,
                  options: dict | None = None, ce_weight: float | None = None, kd_weight: float | None = None,
                  uld_lambda: float | None = None) -> LossPlan:
    """The `LossPlan` of `--loss loss` and its flags.

    `--top-k` is BiLD's k where the loss takes `top_k`; for the other losses it keeps the teacher's
    top-k of the K cached ids (the rest joins the tail mass), which sweeps K without a new cache.

    Raises:
        ConfigError: an unknown loss, an option the loss does not take or out of its declared range,
            or conflicting weights.
    """
    spec = registry.get(loss)
    given = dict(options or {})
    for name, value in (("temperature", temperature), ("tail", tail)):
        if value is not None:
            given[name] = value
    keep_k = None
    if top_k is not None:
        if "top_k" in spec.option_names():
            given["top_k"] = top_k
        elif spec.rows is None:
            raise ConfigError(f"--top-k does not apply to --loss {loss}")
        else:
            keep_k = top_k
    if "sample_temperature" in given:
        raise ConfigError(f"--loss {loss}: sample_temperature is read from the cache index, not set")
    try:
        resolved = spec.resolve(given)  # unknown options and values out of range fail here
    except ConfigError as e:
        raise ConfigError(f"--loss {e}") from None
    if uld_lambda is not None:
        if loss != "uld":
            raise ConfigError(f"--uld-lambda applies to --loss uld, not --loss {loss}")
        if kd_weight is not None:
            raise ConfigError("--uld-lambda is ULD's KD weight; give it or --kd-weight, not both")
        kd_weight = uld_lambda
    return LossPlan(spec, resolved, given, top_k, keep_k, **loss_weights(spec, ce_weight, kd_weight))


def loss_weights(spec: registry.Loss, ce_weight: float | None, kd_weight: float | None) -> dict[str, float]:
    """{"ce_weight", "kd_weight"}: the given weights, or the loss's declared defaults.

    Raises:
        ConfigError: a KD weight for a loss without a teacher term (sft), a negative weight, or both 0.
    """
    if spec.rows is None:
        if kd_weight:
            raise ConfigError(f"--kd-weight does not apply to --loss {spec.name} (no teacher term)")
        if ce_weight is not None and float(ce_weight) != 1.0:
            raise ConfigError(f"--ce-weight {ce_weight}: --loss {spec.name} is the cross entropy alone (weight 1)")
        return {"ce_weight": 1.0, "kd_weight": 0.0}
    weights = {"ce_weight": spec.ce_weight if ce_weight is None else float(ce_weight),
               "kd_weight": spec.kd_weight if kd_weight is None else float(kd_weight)}
    if weights["ce_weight"] < 0 or weights["kd_weight"] < 0 or not (weights["ce_weight"] or weights["kd_weight"]):
        raise ConfigError(f"--ce-weight {weights['ce_weight']} and --kd-weight {weights['kd_weight']}: both must be "
                          f">= 0 and one > 0")
    return weights
