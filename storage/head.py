"""The LM head outside the model: final hidden states -> the logits the model itself computes.

Both stages run the transformer body once and apply the head only at supervised positions, a
chunk of rows at a time: stage one's engines to a teacher (`LMHead`, no gradient), stage two's
fused head + loss to a student (`apply_head`, differentiable). So they need the head as a
standalone function that reproduces the model's own `forward` logits, and it lives here, in the
format, so that the two stages agree on what "the logits" are. That is the output embedding (tied or not, with its bias if any)
plus the scaling some families put around it, which lives in the config:

| config attribute               | families                      | effect                      |
|--------------------------------|-------------------------------|-----------------------------|
| `final_logit_softcapping`      | Gemma 2/3/3n/4, MuseGlimmer   | cap * tanh(logits / cap)    |
| `logit_scale`                  | Cohere family (only)          | logits * s                  |
| `logits_scaling`               | Granite family                | logits / s                  |
| `logits_scaling`               | HyperCLOVA X                  | logits * s                  |
| `logits_scaling`               | MiniCPM3                      | lm_head(hidden / s)         |
| `dim_model_base`               | MiniCPM (remote code)         | lm_head(hidden * base / H)  |
| `lm_head_multiplier`           | Falcon-H1                     | logits * s                  |
| `output_multiplier`            | MuseGlimmer                   | logits * s, before the cap  |

`logits_scaling` means opposite things in different families, so an unknown family that sets it
is refused rather than guessed. A family this table does not know can still scale its logits in
code; `verify_head` compares against the model's own forward, and the HF engine runs it once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from logitcache.storage.errors import ConfigError

__all__ = ["LMHead", "apply_head", "head_from_model", "head_from_checkpoint", "logit_transform", "verify_head"]

_DIVIDE_LOGITS_SCALING = ("granite",)  # model_type prefixes: granite, granitemoe, granite_swa, ...
_MULTIPLY_LOGITS_SCALING = ("hyperclovax",)
_HIDDEN_LOGITS_SCALING = ("minicpm3",)


@dataclass(frozen=True)
class LMHead:
    """A model's output layer as a plain function of final hidden states.

    Attributes:
        weight: (V, H) output embedding; V is the logits width, which may exceed the tokenizer.
        bias: (V,) or None.
        hidden_scale: Factor on the hidden states before the matmul (MiniCPM).
        logit_scale: Factor on the logits after the matmul and bias.
        softcap: If set, logits become softcap * tanh(logits / softcap), after `logit_scale`.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    hidden_scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def width(self) -> int:
        """The logits width V."""
        return self.weight.shape[0]

    @torch.no_grad()  # a teacher: never part of a graph, even when handed trainable weights
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for a chunk of rows.

        Args:
            hidden: (n, H) final hidden states (after the final norm), any float dtype.

        Returns:
            (n, V) logits in the weight's dtype, computed the way the model's forward does: the
            matmul in the weight's dtype, scaling and capping after it.
        """
        return apply_head(hidden.to(device=self.weight.device), self.weight, self.bias, hidden_scale=self.hidden_scale,
                          logit_scale=self.logit_scale, softcap=self.softcap)


def apply_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               hidden_scale: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """The head's arithmetic, differentiable in all three tensors (`LMHead` runs it without a graph).

    Args:
        hidden: (n, H) final hidden states, any float dtype (cast to the weight's).
        weight: (V, H) output embedding. bias: (V,) or None.
        hidden_scale, logit_scale, softcap: as `logit_transform` returns them.

    Returns:
        (n, V) logits in the weight's dtype: the matmul in the weight's dtype, scaling and capping after it.
    """
    h = hidden.to(dtype=weight.dtype)
    if hidden_scale != 1.0:
        h = h * hidden_scale
    logits = torch.nn.functional.linear(h, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def logit_transform(config) -> dict[str, float | None]:
    """The scaling a config puts around the output embedding (see the module's table).

    Args:
        config: A transformers config; multimodal configs are read through `get_text_config()`.

    Returns:
        `hidden_scale`, `logit_scale` and `softcap`, the keyword arguments of `LMHead`.

    Raises:
        ConfigError: the config sets `logits_scaling` and its family is not one whose meaning
            of it is known.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
    hidden_scale, logit_scale = 1.0, 1.0
    softcap = getattr(text, "final_logit_softcapping", None)
    for attr in ("lm_head_multiplier", "output_multiplier"):
        if (value := getattr(text, attr, None)) is not None:
            logit_scale *= float(value)
    # MPT's config has a `logit_scale` too, which its transformers model ignores.
    if model_type.startswith("cohere") and getattr(text, "logit_scale", None) is not None:
        logit_scale *= float(text.logit_scale)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None and float(scaling) != 1.0:
        if model_type.startswith(_DIVIDE_LOGITS_SCALING):
            logit_scale /= float(scaling)
        elif model_type.startswith(_MULTIPLY_LOGITS_SCALING):
            logit_scale *= float(scaling)
        elif model_type.startswith(_HIDDEN_LOGITS_SCALING):
            hidden_scale /= float(scaling)
        else:
            raise ConfigError(
                f"config of model_type {model_type!r} sets logits_scaling={scaling}, whose meaning differs between "
                "families (Granite divides, HyperCLOVA X multiplies); add the family to logitcache's head.py"
            )
    if model_type == "minicpm" and getattr(text, "dim_model_base", None):
        hidden_scale *= float(text.dim_model_base) / float(text.hidden_size)
    return {"hidden_scale": hidden_scale, "logit_scale": logit_scale, "softcap": float(softcap) if softcap else None}


def head_from_model(model) -> LMHead:
    """The head of a loaded transformers causal LM (shares its weights; copies nothing).

    Args:
        model: A `PreTrainedModel` with `get_output_embeddings()` and `config`.
    """
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ConfigError(f"{type(model).__name__} has no output embedding; is it a causal LM?")
    return LMHead(weight=out.weight, bias=getattr(out, "bias", None), **logit_transform(model.config))


def head_from_checkpoint(
    model: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LMHead:
    """Load only the head's tensors from a checkpoint's safetensors files.

    Which tensor is the head (`lm_head.weight`, or the input embedding when tied, or a family's
    own name) is found by building the model on the meta device, which costs no memory, and
    asking it for its output embedding's parameter names.

    Args:
        model: A local model directory or a hub id (resolved through the local HF cache).
        revision: Hub revision.
        trust_remote_code: Allow the checkpoint's own modelling code (to name the parameters).
        dtype: Dtype to hold the weight in; defaults to the checkpoint's.
        device: Where to put the weight.

    Raises:
        ConfigError: no safetensors tensor in the checkpoint matches the head's parameter names.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    out = skeleton.get_output_embeddings()
    names = {"weight": _param_names(skeleton, out.weight)}
    if getattr(out, "bias", None) is not None:
        names["bias"] = _param_names(skeleton, out.bias)
    weight_map = _safetensors_weight_map(model, revision)
    tensors = {}
    for role, candidates in names.items():
        found = next((n for n in candidates if n in weight_map), None)
        if found is None:
            raise ConfigError(
                f"none of {sorted(candidates)} (the {type(skeleton).__name__} head's {role}) is in the safetensors "
                f"files of {model!r}; use the hf engine or vllm_path='logprobs'"
            )
        with safe_open(_resolve_file(model, weight_map[found], revision), framework="pt", device="cpu") as f:
            tensors[role] = f.get_tensor(found).to(device=device, dtype=dtype)
    return LMHead(weight=tensors["weight"], bias=tensors.get("bias"), **logit_transform(config))


@torch.inference_mode()
def verify_head(model, head: LMHead, token_ids: torch.Tensor, *, rtol: float = 1e-2) -> None:
    """Check that `head` on the model's final hidden states gives the model's own logits.

    Args:
        model: The transformers causal LM `head` was built for.
        head: Its head.
        token_ids: (1, T) int64 input to compare on, on the model's device.
        rtol: Allowed max |difference| as a fraction of the largest |logit|; the default
            admits bf16 rounding, not a missing scale or cap.

    Raises:
        ConfigError: the logits differ, i.e. the family transforms its logits in a way
            `logit_transform` does not know.
    """
    own = model(input_ids=token_ids).logits[0].float()
    hidden = model.base_model(input_ids=token_ids).last_hidden_state[0]
    ours = head(hidden).float()
    err, scale = (ours - own).abs().max().item(), own.abs().max().item()
    if not err <= rtol * scale:
        raise ConfigError(
            f"the standalone LM head of {type(model).__name__} (model_type {model.config.model_type!r}) differs from "
            f"the model's own logits by {err:.3g} (largest logit {scale:.3g}); its logit scaling is not in head.py"
        )


def _param_names(module: torch.nn.Module, param: torch.Tensor) -> set[str]:
    # Tied weights answer to several names; the checkpoint holds one of them.
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p is param}


def _safetensors_weight_map(model: str, revision: str | None) -> dict[str, str]:
    """Tensor name -> safetensors file name, for a sharded or a single-file checkpoint."""
    try:
        index = _resolve_file(model, "model.safetensors.index.json", revision)
    except FileNotFoundError:
        index = None
    if index is not None:
        return json.loads(Path(index).read_text())["weight_map"]
    from safetensors import safe_open

    try:
        single = _resolve_file(model, "model.safetensors", revision)
    except FileNotFoundError as e:
        raise ConfigError(f"{model!r} has no model.safetensors[.index.json]; the pooling path reads safetensors") from e
    with safe_open(single, framework="pt", device="cpu") as f:
        return {name: "model.safetensors" for name in f.keys()}


def _resolve_file(model: str, filename: str, revision: str | None) -> str:
    if os.path.isdir(model):
        path = os.path.join(model, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(model, filename, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        raise FileNotFoundError(f"{model}/{filename}") from e
