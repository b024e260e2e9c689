"""The loss settings of a run, decided once: the loss's options, the cached columns kept, the CE/KD weights.

    settings = loss_settings("bild", temperature=None, top_k=8, tail=None, options={}, ce_weight=None,
                             kd_weight=None, uld_lambda=None)
    # {"options": {"top_k": 8}, "keep_k": None, "ce_weight": 1.0, "kd_weight": 1.0}
"""

import inspect

from logitcache.stages.train.losses import ULD_KD_WEIGHT, get_loss
from logitcache.storage.errors import ConfigError

__all__ = ["loss_settings", "loss_weights"]

# Loss arguments the trainer supplies itself; not settable as options.
_RESERVED = {"student_logits", "teacher_ids", "teacher_logprobs", "labels", "counts", "tail_mass", "metrics",
             "chunk_size"}


def loss_settings(loss: str, *, temperature: float | None, top_k: int | None, tail: str | None, options: dict,
                  ce_weight: float | None, kd_weight: float | None, uld_lambda: float | None) -> dict:
    """The loss's keyword options, the cached columns to keep, and the CE/KD weights.

    `--top-k` is BiLD's k where the loss takes `top_k`; for the other losses it keeps the teacher's
    top-k of the K cached ids (the rest joins the tail mass), which sweeps K without a new cache.

    Returns:
        {"options": dict, "keep_k": int | None, "ce_weight": float, "kd_weight": float}

    Raises:
        ConfigError: an option the loss does not take, or conflicting weights.
    """
    params = set(inspect.signature(get_loss(loss)).parameters)
    given = dict(options)
    for flag, name, value in (("--temperature", "temperature", temperature), ("--tail", "tail", tail)):
        if value is not None:
            given[name] = value
    opts = {}
    for name, value in given.items():
        if name in _RESERVED or name not in params:
            takes = sorted(params - _RESERVED - {"top_k"})
            raise ConfigError(f"--loss {loss} has no option {name!r}; it takes {', '.join(takes) or 'none'}")
        opts[name] = value
    keep_k = None
    if top_k is not None:
        if "top_k" in params:
            opts["top_k"] = top_k
        elif loss == "sft":
            raise ConfigError("--top-k does not apply to --loss sft")
        else:
            keep_k = top_k
    if uld_lambda is not None:
        if loss != "uld":
            raise ConfigError(f"--uld-lambda applies to --loss uld, not --loss {loss}")
        if kd_weight is not None:
            raise ConfigError("--uld-lambda is ULD's KD weight; give it or --kd-weight, not both")
        kd_weight = uld_lambda
    return {"options": opts, "keep_k": keep_k, **loss_weights(loss, ce_weight, kd_weight)}


def loss_weights(loss: str, ce_weight: float | None, kd_weight: float | None) -> dict[str, float]:
    """{"ce_weight", "kd_weight"}: the given weights, or the loss's defaults (1 and 1; ULD's 1.5; sft 1 and 0).

    Raises:
        ConfigError: a KD weight for sft, a negative weight, or both weights 0.
    """
    if loss == "sft":
        if kd_weight:
            raise ConfigError("--kd-weight does not apply to --loss sft (no teacher term)")
        if ce_weight is not None and float(ce_weight) != 1.0:
            raise ConfigError(f"--ce-weight {ce_weight}: --loss sft is the cross entropy alone (weight 1)")
        return {"ce_weight": 1.0, "kd_weight": 0.0}
    default_kd = ULD_KD_WEIGHT if loss == "uld" else 1.0
    weights = {"ce_weight": 1.0 if ce_weight is None else float(ce_weight),
               "kd_weight": default_kd if kd_weight is None else float(kd_weight)}
    if weights["ce_weight"] < 0 or weights["kd_weight"] < 0 or not (weights["ce_weight"] or weights["kd_weight"]):
        raise ConfigError(f"--ce-weight {weights['ce_weight']} and --kd-weight {weights['kd_weight']}: both must be "
                          f">= 0 and one > 0")
    return weights
