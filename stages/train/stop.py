"""Stop training cleanly on SIGTERM or SIGINT: finish the step, save a checkpoint, return.

A preempted job (Slurm, Kubernetes, a spot instance) gets SIGTERM and some seconds of grace. The
default action would kill the process mid-step and lose everything since the last checkpoint. The
handler here only sets a flag; at the end of the optimizer step in flight, `StopOnSignal` asks the
Trainer to save (model, optimizer, scheduler, RNG states, and through `_SaveDataPosition` the
stream's position, all for the same step) and to stop. `--resume` then continues exactly there.
A second SIGINT interrupts at once (KeyboardInterrupt), for a user who does not want to wait.

Stage one has its twin (`stages/precompute/run.py:_StopSignals`, which stops between shards): stages do
not import each other, and when to stop is no part of the cache format that `storage/` owns.
"""

import signal
import sys
import threading

from transformers import TrainerCallback

__all__ = ["StopOnSignal"]


class StopOnSignal(TrainerCallback):
    """A Trainer callback and a context manager that installs the handlers while it is entered.

    Attributes:
        signum: the signal that asked to stop, or None.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        # Python lets only the main thread install handlers; elsewhere signals keep their defaults.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        print(f"train: got {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping",
              file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
