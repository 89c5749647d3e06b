"""Preprocessed cases that cannot be read during training.

Among 100k pretraining volumes one unreadable file is likely, and it must not end a week-long run: the pretraining
loader skips such a case (another case takes its place in the batch) and reports it with the batch; the trainer logs
one line per case, keeps the list in its checkpoints, and stops with an error only when more cases than
``nnssl_max_unreadable_cases`` failed (a count, or a percentage of the cases such as ``2%``; default: 1 % of the cases
or 10, whichever is larger). Segmentation training keeps nnU-Net's behaviour, every labeled case counts: the first
unreadable case ends it, with an error naming the file.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Tuple

from nnssl.errors import UserError
from nnssl.integration.environment import EnvironmentVariableError, text_from_environment

MAX_UNREADABLE_VARIABLE = "nnssl_max_unreadable_cases"
BATCH_KEY = "nnssl_unreadable"  # what a loader adds to a batch: [(case, problem), ...]
DEFAULT_FRACTION, DEFAULT_MINIMUM = 0.01, 10


class UnreadableCaseError(UserError, RuntimeError):
    """A preprocessed case could not be read (segmentation training), or too many could not (pretraining)."""


def unreadable_report(folder: str, case: str, error: BaseException) -> Tuple[str, str]:
    """(case, problem) for a batch's report: the case's preprocessed image file and the error's first line."""
    first = (str(error).strip().splitlines() or [""])[0]
    what = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return case, f"{os.path.join(folder, case + '.b2nd')} (or its _seg.b2nd / .pkl): {what}"


def unreadable_case_limit(num_cases: int) -> int:
    """How many unreadable cases a pretraining run tolerates (``nnssl_max_unreadable_cases``)."""
    raw = text_from_environment(MAX_UNREADABLE_VARIABLE)
    if raw is None:
        return max(DEFAULT_MINIMUM, math.ceil(DEFAULT_FRACTION * num_cases))
    try:
        if raw.endswith("%"):
            percent = float(raw[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return math.floor(percent / 100 * num_cases)
        value = int(raw)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise EnvironmentVariableError(f"Environment variable {MAX_UNREADABLE_VARIABLE}={raw!r}: give a number of "
                                       f"cases (e.g. 25) or a percentage of the cases (e.g. 2%).") from None


class UnreadableCases:
    """The distinct cases skipped so far, and the limit past which the run stops."""

    def __init__(self, limit: int, num_cases: int) -> None:
        self.limit = limit
        self.num_cases = num_cases
        self.cases: Dict[str, str] = {}

    def note(self, reported: Iterable[Tuple[str, str]]) -> List[str]:
        """Record a batch's reports; the log lines for cases not seen before."""
        lines = []
        for case, problem in reported:
            case = str(case)  # nnU-Net's identifiers are numpy strings
            if case not in self.cases:
                self.cases[case] = problem
                lines.append(f"Skipped unreadable case {case}: {problem} ({len(self.cases)} unreadable so far, "
                             f"limit {self.limit})")
        return lines

    @property
    def exceeded(self) -> bool:
        return len(self.cases) > self.limit

    def error(self) -> UnreadableCaseError:
        listed = "; ".join(f"{case}: {problem}" for case, problem in self.cases.items())
        return UnreadableCaseError(f"{len(self.cases)} of {self.num_cases} preprocessed cases could not be read, more "
                                   f"than the limit of {self.limit} ({MAX_UNREADABLE_VARIABLE}); training stopped. "
                                   f"Preprocess these cases again (nnUNetv2_preprocess) or remove them, or raise the limit, and resume "
                                   f"with --c: {listed}")
