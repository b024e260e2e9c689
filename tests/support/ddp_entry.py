"""Entry point for the DDP test: `logitcache train` under torchrun, recording the rows each rank trains on.

    torchrun --nproc-per-node 2 tests/support/ddp_entry.py train --student ... --out OUT ...

Writes OUT/rows_rank{r}.json: the source row of every sequence rank r's training steps consumed,
OUT/wrapper_rank{r}.txt: the class of the model the steps ran (DDP, or FSDP2's FSDP<Model> class), and
OUT/eval_rank{r}.npz: for each evaluation while training, the positions rank r scored itself and the
per-position scores the shared evaluation returned (it asks `evaluate_source` for them).
"""

import json
import os
import sys

import numpy as np

import logitcache.stages.train.evaluate as evaluate
from logitcache.pipeline.cli import main
from logitcache.stages.train.trainer import KDTrainer

seen = []
wrapper = []
scored = []  # per evaluation: the rows this rank scored itself
scores = []  # per evaluation: the per-position scores every rank returns
_step = KDTrainer.training_step
_source, _rows = evaluate.evaluate_source, evaluate.row_logits


def recording_step(self, model, inputs, num_items_in_batch=None):
    seen.extend(inputs["row_index"].tolist())
    wrapper[:] = [type(model).__name__]
    return _step(self, model, inputs, num_items_in_batch)


def recording_source(*args, **kwargs):
    scored.append(0)
    found = _source(*args, **{**kwargs, "per_position": True})
    scores.append(found.pop("per_position"))
    return found


def recording_rows(model, inputs, rows, **kwargs):
    scored[-1] += rows.shape[0]
    return _rows(model, inputs, rows, **kwargs)


KDTrainer.training_step = recording_step
evaluate.evaluate_source, evaluate.row_logits = recording_source, recording_rows

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    out = sys.argv[sys.argv.index("--out") + 1]
    rank = os.environ.get("RANK", 0)
    with open(os.path.join(out, f"rows_rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    with open(os.path.join(out, f"wrapper_rank{rank}.txt"), "w") as f:
        f.write("".join(wrapper))
    np.savez(os.path.join(out, f"eval_rank{rank}.npz"), scored=np.array(scored, dtype=np.int64),
             **{f"{key}{i}": value for i, found in enumerate(scores) for key, value in found.items()})
    sys.exit(rc)
