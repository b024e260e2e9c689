"""Online distillation: the teacher runs in the training loop and supplies its full distribution.

    logitcache train --student ./small --cache ./cache --online-teacher ./teacher --loss bild --out ./online

The cached run's counterpart, for measuring what the cache loses: `OnlineTeacher` replaces a batch's
cached targets with the teacher's log-probs over its **whole** vocabulary, sorted by log-prob
descending, at the same supervised rows. That is a cache with K = V, so every top-K loss computes its
full-vocabulary original on it (no tail, every id covered), with the same code as the cached run.
With `--cache` the batches are the cache's (same order, same seed), so a cached and an online student
see the same tokens and differ only in the targets.

Cost: one teacher forward per micro-batch and an (N, V) sort, on the student's device, and 8 bytes per
(row, vocabulary id) for the sorted targets (int32 ids, float32 log-probs): 4.9 GB for 4,096 rows at
V = 151,936. It is meant for measuring a cache against its original at small scale, not for training
at scale, which is what the cache is for.
"""

import torch

from logitcache.stages.train.losses import registry
from logitcache.storage.errors import ConfigError

__all__ = ["OnlineTeacher", "online_losses", "check_online_loss", "load_online_teacher"]

_CACHED = ("teacher_ids", "teacher_logprobs", "tail_mass", "sample_counts", "sample_logprobs", "kd_select")


class OnlineTeacher:
    """Fills a collated batch's teacher targets from a teacher model's forward pass.

    Args:
        model: a causal LM with the student's tokenizer, in eval mode.
        vocab_size: the logits columns that are real tokens (as for the student, see `checks`).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        self.model, self.vocab_size = model.eval(), int(vocab_size)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        """`batch` with teacher_ids (N, V) int32 and teacher_logprobs (N, V) float32 at its N rows,
        sorted by log-prob descending, and tail_mass (N,) zeros; cached targets are dropped.
        """
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        flat = logits.reshape(-1, logits.shape[-1])[:, :self.vocab_size]
        logprobs = torch.log_softmax(flat.index_select(0, batch["rows"].to(device)).float(), dim=-1)
        values, ids = logprobs.sort(dim=-1, descending=True)
        out = {k: v for k, v in batch.items() if k not in _CACHED}
        out.update(teacher_ids=ids.to(torch.int32), teacher_logprobs=values,
                   tail_mass=values.new_zeros(values.shape[0]))
        return out


def online_losses() -> tuple[str, ...]:
    """The declared losses the online teacher can feed: those that read sorted top-K targets and no
    other per-row input (rskd reads sample counts), read from the registry at each call."""
    return tuple(name for name, spec in registry.LOSSES.items()
                 if spec.rows is not None and registry.TOPK in spec.modes and not spec.inputs())


def check_online_loss(loss: str) -> None:
    """ConfigError unless `--online-teacher` can feed `--loss loss` (see `online_losses`)."""
    if loss not in online_losses():
        raise ConfigError(f"--online-teacher gives the teacher's full distribution to a top-K loss "
                          f"({', '.join(online_losses())}); --loss {loss} is not one")


def load_online_teacher(path: str, *, loss: str, student_tokenizer, student_vocab: int, device,
                        trust_remote_code: bool = False) -> OnlineTeacher:
    """Load the teacher at `path` for `loss`, refusing one that cannot stand in for a cache.

    Raises:
        ConfigError: a loss that does not read top-K targets, an unloadable teacher, or a teacher
            whose tokenizer differs from the student's (its ids would mean other tokens).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.stages.train.checks import student_vocab_size
    from logitcache.storage import tokenizer_fingerprint

    check_online_loss(loss)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--online-teacher {path}: cannot load the model ({e})") from None
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(student_tokenizer):
        raise ConfigError(f"--online-teacher {path} has another tokenizer than the student; online distillation "
                          f"compares token ids, so it needs the same tokenizer")
    vocab = student_vocab_size(tokenizer, model.get_output_embeddings().weight.shape[0], student=path)
    if vocab != student_vocab:
        raise ConfigError(f"--online-teacher {path} has {vocab} tokens, the student {student_vocab}")
    model.requires_grad_(False)
    return OnlineTeacher(model.to(device), vocab)
