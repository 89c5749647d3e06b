"""Reading nnssl's environment variables with errors that name the variable and the bad value.

A variable that is set but empty (``nnssl_num_epochs=``) is an error, not "unset": treating it as unset silently
started a full-length run. Unset the variable (``unset nnssl_num_epochs``) to get the default.
"""

import os
from typing import Optional

from nnssl.errors import UserError


class EnvironmentVariableError(UserError, ValueError):
    """An ``nnssl_*`` variable with a value nnssl cannot use (the message names the variable and the value)."""


def text_from_environment(variable: str) -> Optional[str]:
    """The variable's value without surrounding blanks; None when unset, an error when set but empty."""
    raw = os.environ.get(variable)
    if raw is None:
        return None
    if not raw.strip():
        raise EnvironmentVariableError(f"Environment variable {variable} is set but empty. Give it a value or unset "
                                       f"it (unset {variable}) for the default.")
    return raw.strip()


def int_from_environment(variable: str, default: Optional[int], minimum: int) -> Optional[int]:
    """The variable's value as an int of at least ``minimum``, or ``default`` when it is unset."""
    raw = text_from_environment(variable)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvironmentVariableError(f"Environment variable {variable}={raw!r} is not a whole number. "
                                       f"Set it to an integer of at least {minimum} or unset it.") from None
    if value < minimum:
        raise EnvironmentVariableError(f"Environment variable {variable}={raw!r} must be at least {minimum}.")
    return value


def positive_int_from_environment(variable: str, default: Optional[int]) -> Optional[int]:
    """The variable's value as a positive int, or ``default`` when it is unset."""
    return int_from_environment(variable, default, minimum=1)


def flag_from_environment(variable: str) -> bool:
    """True for 1/true/yes, False when unset or 0/false/no; anything else (empty too) is an error naming it."""
    raw = text_from_environment(variable)
    if raw is None or raw.lower() in ("0", "false", "no"):
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    raise EnvironmentVariableError(f"Environment variable {variable}={raw!r} must be 1 (on) or 0 (off).")
