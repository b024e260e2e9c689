"""Synthetic sparse targets for tests: computed from random logits the way an engine computes them.

Defined once, in the package's contract suite (`logitcache.storage.testing`); re-exported here
under the names the tests use.
"""

from logitcache.storage.testing import TEXT_FIELDS, VOCAB, make_sequence
from logitcache.storage.testing import index_metadata as metadata

__all__ = ["TEXT_FIELDS", "VOCAB", "make_sequence", "metadata"]
