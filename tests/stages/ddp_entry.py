"""Entry point for the DDP test: `logitcache train` under torchrun, recording the rows each rank trains on.

    torchrun --nproc-per-node 2 tests/stages/ddp_entry.py train --student ... --out OUT ...

Writes OUT/rows_rank{r}.json: the source row of every sequence rank r's training steps consumed, and
OUT/wrapper_rank{r}.txt: the class of the model the steps ran (DDP, or FSDP2's FSDP<Model> class).
"""

import json
import os
import sys

from logitcache.pipeline.cli import main
from logitcache.stages.train.trainer import KDTrainer

seen = []
wrapper = []
_step = KDTrainer.training_step


def recording_step(self, model, inputs, num_items_in_batch=None):
    seen.extend(inputs["row_index"].tolist())
    wrapper[:] = [type(model).__name__]
    return _step(self, model, inputs, num_items_in_batch)


KDTrainer.training_step = recording_step

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    out = sys.argv[sys.argv.index("--out") + 1]
    with open(os.path.join(out, f"rows_rank{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump(seen, f)
    with open(os.path.join(out, f"wrapper_rank{os.environ.get('RANK', 0)}.txt"), "w") as f:
        f.write("".join(wrapper))
    sys.exit(rc)
