"""The base class of every error a user can fix (a bad input, variable, folder or checkpoint).

nnssl's commands print such an error as one line and exit 1, and so do stock nnU-Net commands once they run an
nnssl class (``nnssl.integration.user_errors``); any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment; ``str(error)`` is the whole message: what is wrong, which
    file or variable, and what to do instead."""


class InvalidValueError(UserError, ValueError):
    """A value the user chose (an option, a plans entry, a checkpoint's architecture) that nnssl cannot use; still a
    ValueError for code that calls nnssl as a library."""


class PretrainedWeightsError(UserError, RuntimeError):
    """A pretrained checkpoint that cannot be used: unreadable, wrong format, or not matching the network."""
