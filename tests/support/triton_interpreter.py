"""Triton kernels on CPU tensors, under Triton's interpreter, in a child process.

Triton chooses between compiling and interpreting when each `@triton.jit` runs, its own
`tl.zeros`, `tl.topk`, ... included, and those run when triton is first imported. A test process
may already have imported triton (vLLM does), and setting TRITON_INTERPRET=1 for the whole test
session would change what other tests run. So the kernels run in one spawned child per test
module, whose environment sets it before anything imports triton:

    with interpreter_pool() as pool:
        out = pool.submit(triton_topk, hidden, head, next_ids, 8, splits=2).result()

Arguments and results (tensors, `LMHead`, numpy arrays) cross the process boundary by pickle; the
child's exceptions are re-raised in the parent.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def _interpret() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    assert triton.knobs.runtime.interpret, "triton was imported before TRITON_INTERPRET was set"


def interpreter_pool() -> ProcessPoolExecutor:
    """One spawned worker process in which Triton kernels are interpreted."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_interpret)


def triton_topk(*args, **kwargs):
    """`fused_topk_triton.triton_topk_targets`, run in the interpreter's process."""
    from logitcache.stages.precompute.fused_topk_triton import triton_topk_targets

    return triton_topk_targets(*args, **kwargs)
