"""Graceful preemption: a signal asks the training to stop; every rank finishes its current iteration, the ranks agree
on the step to stop at, rank 0 writes ``checkpoint_latest.pth`` and the processes exit with ``PREEMPTED_EXIT_CODE``.

Clusters announce the end of a job with a signal some time before they kill it (SLURM: ``--signal``, then SIGTERM,
then SIGKILL; torchrun passes SIGTERM on to its ranks). ``nnssl_preemption_signal`` says which signals mean "stop
and checkpoint": ``USR1``, ``TERM``, ``USR1,TERM`` (the default) or ``none``.
"""

from __future__ import annotations

import signal
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from nnssl.integration.environment import EnvironmentVariableError, text_from_environment

PREEMPTION_SIGNAL_VARIABLE = "nnssl_preemption_signal"
DEFAULT_PREEMPTION_SIGNALS = "USR1,TERM"
# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry" (the rerun resumes by itself)
PREEMPTED_EXIT_CODE = 75
_SIGNALS = {"USR1": signal.SIGUSR1, "TERM": signal.SIGTERM}


def preemption_signals() -> Tuple[signal.Signals, ...]:
    """The signals that mean "checkpoint and stop", from ``nnssl_preemption_signal``."""
    raw = text_from_environment(PREEMPTION_SIGNAL_VARIABLE) or DEFAULT_PREEMPTION_SIGNALS
    if raw.lower() == "none":
        return ()
    names = [name.strip().upper().removeprefix("SIG") for name in raw.split(",")]
    unknown = [name for name in names if name not in _SIGNALS]
    if unknown or not names:
        raise EnvironmentVariableError(f"Environment variable {PREEMPTION_SIGNAL_VARIABLE}={raw!r}: use USR1, TERM, "
                                       f"USR1,TERM (the default) or none.")
    return tuple(dict.fromkeys(_SIGNALS[name] for name in names))


class PreemptionRequest:
    """Remembers the first preemption signal received; the trainer looks at it between iterations."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[signal.Signals, object] = {}

    def install(self, signals: Sequence[signal.Signals]) -> None:
        """Handle ``signals`` in this process (Python delivers signals to the main thread only; elsewhere nothing is
        installed and the signals keep their actions)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name


def agreed_flags(flags: Sequence[bool], device: torch.device) -> Tuple[bool, ...]:
    """Each flag OR-ed over all ranks (the flags themselves without a process group). Collective: every rank must
    call it at the same step, which makes it the point where the ranks agree to stop."""
    if not (dist.is_available() and dist.is_initialized()):
        return tuple(bool(flag) for flag in flags)
    tensor = torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in tensor.tolist())


class Preempted(SystemExit):
    """The training stopped at a preemption request after writing its checkpoint; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
