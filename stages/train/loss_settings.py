"""The loss settings of a run, decided once: the loss's options, the cached columns kept, the CE/KD weights.

Everything is read from the loss's declaration (`losses.registry`): the options it takes and their
ranges, and its default weights.

    settings = loss_settings("bild", temperature=None, top_k=8, tail=None, options={}, ce_weight=None,
                             kd_weight=None, uld_lambda=None)
    # {"options": {"top_k": 8}, "keep_k": None, "ce_weight": 0.0, "kd_weight": 1.0}
"""

from logitcache.stages.train.losses import registry
from logitcache.storage.errors import ConfigError

__all__ = ["loss_settings", "loss_weights"]


def loss_settings(loss: str, *, temperature: float | None, top_k: int | None, tail: str | None, options: dict,
                  ce_weight: float | None, kd_weight: float | None, uld_lambda: float | None) -> dict:
    """The loss's keyword options, the cached columns to keep, and the CE/KD weights.

    `--top-k` is BiLD's k where the loss takes `top_k`; for the other losses it keeps the teacher's
    top-k of the K cached ids (the rest joins the tail mass), which sweeps K without a new cache.

    Returns:
        {"options": dict (only those given), "keep_k": int | None, "ce_weight": float, "kd_weight": float}

    Raises:
        ConfigError: an option the loss does not take or out of its declared range, or conflicting weights.
    """
    spec = registry.get(loss)
    given = dict(options)
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
        spec.resolve(given)  # unknown options and values out of range fail here
    except ConfigError as e:
        raise ConfigError(f"--loss {e}") from None
    if uld_lambda is not None:
        if loss != "uld":
            raise ConfigError(f"--uld-lambda applies to --loss uld, not --loss {loss}")
        if kd_weight is not None:
            raise ConfigError("--uld-lambda is ULD's KD weight; give it or --kd-weight, not both")
        kd_weight = uld_lambda
    return {"options": given, "keep_k": keep_k, **loss_weights(loss, ce_weight, kd_weight)}


def loss_weights(loss: str, ce_weight: float | None, kd_weight: float | None) -> dict[str, float]:
    """{"ce_weight", "kd_weight"}: the given weights, or the loss's declared defaults.

    Raises:
        ConfigError: a KD weight for a loss without a teacher term (sft), a negative weight, or both 0.
    """
    spec = registry.get(loss)
    if spec.rows is None:
        if kd_weight:
            raise ConfigError(f"--kd-weight does not apply to --loss {loss} (no teacher term)")
        if ce_weight is not None and float(ce_weight) != 1.0:
            raise ConfigError(f"--ce-weight {ce_weight}: --loss {loss} is the cross entropy alone (weight 1)")
        return {"ce_weight": 1.0, "kd_weight": 0.0}
    weights = {"ce_weight": spec.ce_weight if ce_weight is None else float(ce_weight),
               "kd_weight": spec.kd_weight if kd_weight is None else float(kd_weight)}
    if weights["ce_weight"] < 0 or weights["kd_weight"] < 0 or not (weights["ce_weight"] or weights["kd_weight"]):
        raise ConfigError(f"--ce-weight {weights['ce_weight']} and --kd-weight {weights['kd_weight']}: both must be "
                          f">= 0 and one > 0")
    return weights
