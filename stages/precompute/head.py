"""Moved to `logitcache.storage.head`: both stages apply the LM head the same way (see there)."""

from logitcache.storage.head import LMHead, apply_head, head_from_checkpoint, head_from_model, logit_transform, verify_head

__all__ = ["LMHead", "apply_head", "head_from_model", "head_from_checkpoint", "logit_transform", "verify_head"]
