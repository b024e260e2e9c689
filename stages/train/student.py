"""The student as training and evaluation both load it, what it can run, and the batches evaluation reads.

    student = load_student("Qwen/Qwen2.5-0.5B", dtype="bfloat16")
    student.model, student.tokenizer, student.vocab_size, student.pad_id, student.max_length
    for batch in collated_batches(items, pad_id=student.pad_id, batch_size=8): ...
    fused_head_problem(student.model) or packing_problem(student.model)   # None: it can
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from logitcache.stages.train.checks import student_vocab_size
from logitcache.stages.train.collate import Collator
from logitcache.storage.errors import ConfigError

__all__ = ["DTYPES", "Student", "load_student", "collated_batches", "fused_head_problem", "packing_problem"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Student:
    """A loaded student.

    Attributes:
        model: the transformers causal LM. tokenizer: its tokenizer.
        vocab_size: the logits columns training and evaluation use (`checks.student_vocab_size`).
        pad_id: the id that pads batches (pad, else eos, else 0).
        max_length: the default truncation: the model's context (`max_position_embeddings`), or None.
    """

    model: object
    tokenizer: object
    vocab_size: int
    pad_id: int
    max_length: int | None


def load_student(name: str, *, dtype: str | None = "float32", trust_remote_code: bool = False,
                 device: str | None = None, flag: str = "--student", revision: str | None = None,
                 attn_implementation: str | None = None) -> Student:
    """Load a student model and its tokenizer.

    Args:
        name: a model directory or hub id.
        dtype: a key of `DTYPES`, or None for transformers' default.
        device: where to put the model (None: leave it where transformers loads it).
        flag: the option that named the model, for error messages.
        revision: hub revision of the model and tokenizer.
        attn_implementation: transformers' attention ("sdpa", "eager", ...); None: its default.

    Raises:
        ConfigError: an unknown dtype, or a model that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected {', '.join(DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
        kwargs = {"dtype": DTYPES[dtype]} if dtype else {}
        if revision:
            kwargs["revision"] = revision
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # no such model, no weights, a config of an unknown kind
        raise ConfigError(f"{flag} {name}: cannot load the model or its tokenizer ({e})") from None
    if device is not None:
        model = model.to(device)
    vocab = student_vocab_size(tokenizer, model.get_output_embeddings().weight.shape[0], student=name)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    return Student(model, tokenizer, vocab, pad_id, getattr(model.config, "max_position_embeddings", None))


def collated_batches(items: Iterable[dict], *, pad_id: int, batch_size: int,
                     max_sequences: int | None = None) -> Iterator[dict]:
    """Items (see `alignment`) collated `batch_size` at a time, in order; the last batch may be short."""
    collate = Collator(pad_id=pad_id)
    taken, chunk = 0, []
    for item in items:
        if max_sequences is not None and taken >= max_sequences:
            break
        chunk.append(item)
        taken += 1
        if len(chunk) == batch_size:
            yield collate(chunk)
            chunk = []
    if chunk:
        yield collate(chunk)


# Attention implementations that keep packed items apart given position_ids alone (see `collate`).
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def packing_problem(model) -> str | None:
    """Why `model` cannot train on packed rows (`Collator(pack=True)`), or None if it can."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        return (f"its attention implementation {impl!r} does not separate packed items by position_ids; "
                f"load it with one of {', '.join(PACKED_ATTENTION)}")
    return None


def fused_head_problem(model, args=None, *, fsdp: bool = False) -> str | None:
    """Why `model` cannot train with the fused head and loss, or None if it can.

    The fused path takes the head's weight and applies it itself, so it needs a plain linear head
    (not a PEFT-wrapped or quantized one), a decoder to hook and a forward that takes
    `logits_to_keep`. Under FSDP it reads the weight inside the forward, where FSDP has gathered it
    (`KDTrainer._fused_loss`); DeepSpeed shards it outside, and FSDP with LoRA is untested.

    Args:
        args: the run's `TrainingArguments` (its fsdp and deepspeed settings), or None.
        fsdp: FSDP is on by other means (an accelerate config; `KDTrainer.is_fsdp_enabled`).
    """
    import inspect

    if args is not None and args.deepspeed:
        return "DeepSpeed shards the head's weight outside the forward"
    if (fsdp or (args is not None and args.fsdp)) and hasattr(model, "get_base_model"):
        return "under FSDP the fused head is tested without LoRA only"
    if hasattr(model, "get_base_model"):  # a peft model: its forward passes logits_to_keep on
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) is not torch.nn.Linear:
        return f"the output embedding is {type(head).__name__}, not a plain torch.nn.Linear"
    if not hasattr(model, "get_decoder") or model.get_decoder() is model:
        return f"{type(model).__name__} has no decoder module to take the final hidden states from"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    return None
