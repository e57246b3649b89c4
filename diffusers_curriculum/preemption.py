"""Pre-emption: on SIGTERM, finish the current optimizer step, write a checkpoint and exit.

Cloud schedulers and ``torchrun`` send SIGTERM before they kill a job. The handler only records the signal;
the training loop asks :meth:`Preemption.requested` after every optimizer step, so the checkpoint is written
between steps, on every rank at the same step (the flag is all-reduced), through the same crash-safe path
as any other checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM-ended process (143)


class Preemption:
    """Context manager that turns SIGTERM into a flag for the training loop."""

    def __init__(self):
        self.signalled = False
        self._previous = None

    def _handle(self, signum, frame):
        self.signalled = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank has been signalled."""
        if accelerator.num_processes == 1:
            return self.signalled
        flag = torch.tensor(float(self.signalled), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)
