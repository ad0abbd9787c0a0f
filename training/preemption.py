"""Preemption: turn SIGTERM/SIGUSR1/SIGUSR2 into "save a checkpoint at the next step, then exit".

The handler only records the signal; the training loop polls :attr:`PreemptionHandler.requested`
at optimizer-step boundaries (all ranks agree through an all-reduce), saves, and calls
:meth:`PreemptionHandler.exit`. If another handler was installed before ours -- submitit installs
one that requeues the SLURM job -- it is called after the checkpoint is on disk, so the requeued
job finds it and resumes.
"""

from __future__ import annotations

import logging
import signal
import sys

log = logging.getLogger(__name__)

# Exit status after a preemption checkpoint: 128 + SIGTERM, what a process killed by SIGTERM reports,
# so schedulers that requeue preempted jobs treat it as preempted, not as a bug.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def signal_from_name(name: str) -> signal.Signals:
    full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if not hasattr(signal, full):
        raise ValueError(f"preempt_signals: unknown signal {name!r} (expected names like SIGTERM, SIGUSR1)")
    return signal.Signals(getattr(signal, full))


class PreemptionHandler:
    def __init__(self, signal_names=("SIGTERM", "SIGUSR1", "SIGUSR2")):
        self.signals = [signal_from_name(n) for n in signal_names]
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        # Keep the handler minimal: no I/O or allocation-heavy work inside a signal handler.
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def exit(self) -> None:
        """After the checkpoint is written: hand the signal to the previous handler, then exit."""
        sig = self.received
        previous = self._previous.get(sig) if sig is not None else None
        self.uninstall()
        if callable(previous):
            log.info("passing %s on to the previously installed handler (e.g. submitit's requeue)", sig.name)
            previous(sig, None)
        sys.exit(PREEMPTED_EXIT_CODE)
