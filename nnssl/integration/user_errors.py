"""One line instead of a traceback for mistakes a user can fix, and for Ctrl-C.

nnssl's own commands run their body through ``run_user_command``; stock nnU-Net commands (``nnUNetv2_train``, ...)
get ``install_excepthook`` as soon as nnU-Net looks up an nnssl class (``nnssl.integration.registry``), so errors
raised in a trainer's ``__init__``/``initialize``/``on_train_start`` or while ``--c`` loads a checkpoint end in the
same one line. User errors are ``nnssl.errors.UserError`` and the operating system's "permission denied",
"read-only" and "disk full" errors; every other exception is a bug and keeps its traceback. ``nnssl_debug=1`` shows
the traceback for everything.
"""

import errno
import sys
from typing import Callable, Optional

from nnssl.errors import UserError
from nnssl.integration.environment import flag_from_environment

DEBUG_VARIABLE = "nnssl_debug"
INTERRUPTED_EXIT_CODE = 130
ERROR_EXIT_CODE = 1
PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

_kept_on_interrupt: Optional[Callable[[], str]] = None


def debugging() -> bool:
    """``nnssl_debug`` is on; a value that is not 0/1 also shows tracebacks (more information, never less)."""
    try:
        return flag_from_environment(DEBUG_VARIABLE)
    except UserError:
        return True


def user_message(error: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in PERMISSION_ERRNOS + SPACE_ERRNOS:
        where = f"{error.filename}: " if error.filename else ""
        fix = ("free disk space (or quota) there" if error.errno in SPACE_ERRNOS else
               "make it writable for this user, or point the command at a folder you can write")
        return f"{where}{error.strerror}; {fix}, then rerun."
    return None


def report_kept_on_interrupt(note: Callable[[], str]) -> None:
    """Register what a Ctrl-C keeps (called when the interrupt is reported, so it can look at the files then)."""
    global _kept_on_interrupt
    _kept_on_interrupt = note


def interrupted_line(interrupt: KeyboardInterrupt, kept: Optional[Callable[[], str]] = None) -> str:
    """What was kept: the interrupt's own message (a command that caught Ctrl-C to finish its bookkeeping says
    it there), else ``kept()``, else what a running trainer registered."""
    note = kept or _kept_on_interrupt
    what_was_kept = str(interrupt) or (note() if note else "Rerun the same command to start again.")
    return f"interrupted (Ctrl-C). {what_was_kept}"


def run_user_command(prog: str, body: Callable[[], int], kept: Optional[Callable[[], str]] = None) -> int:
    """``body()``'s exit code; a user error is printed as ``prog: error: ...`` (exit 1), Ctrl-C as ``prog:
    interrupted ...`` saying what was kept (exit 130)."""
    try:
        return body()
    except KeyboardInterrupt as interrupt:
        if debugging():
            raise
        print(f"{prog}: {interrupted_line(interrupt, kept)}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as error:
        message = user_message(error)
        if message is None or debugging():
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return ERROR_EXIT_CODE


def _nnssl_excepthook(previous: Callable) -> Callable:
    def excepthook(kind, error, traceback) -> None:
        if not debugging():
            if isinstance(error, KeyboardInterrupt):  # Python then exits by SIGINT: status 130 in the shell
                print(f"nnssl: {interrupted_line(error)}", file=sys.stderr)
                return
            message = user_message(error)
            if message is not None:
                print(f"nnssl: error: {message}", file=sys.stderr)
                return
        previous(kind, error, traceback)

    excepthook.nnssl_excepthook = True
    return excepthook


def install_excepthook() -> None:
    """Make an uncaught user error in this process one line (idempotent)."""
    if not getattr(sys.excepthook, "nnssl_excepthook", False):
        sys.excepthook = _nnssl_excepthook(sys.excepthook)
