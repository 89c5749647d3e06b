"""Which case a pretraining batch draws: per image (nnU-Net's uniform choice) or subject-balanced.

OpenMind's 114k images come from 34k subjects, some scanned dozens of times: drawing images uniformly lets those
subjects dominate the pretraining data. ``nnssl_sampling=subject`` draws a subject uniformly, then one of its
images uniformly, i.e. case ``c`` of subject ``s`` gets probability ``1 / (n_subjects * n_images(s))``. The subject
of every case comes from ``nnssl_case_metadata.json`` in the raw dataset (``nnssl_ingest --metadata``).

A case without a subject there is refused, not treated as a subject of its own: such cases come in groups (a study
without ``sub-*`` folders, a table without a subject column, images ingested before the table), and as one-image
subjects each of them would outweigh a whole subject with many scans, the opposite of what was asked.
"""

import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnssl.errors import UserError
from nnssl.ingest.summary import CASE_METADATA_FILE, load_case_metadata
from nnssl.integration.environment import EnvironmentVariableError, text_from_environment

SAMPLING_VARIABLE = "nnssl_sampling"
SAMPLING_MODES = ("image", "subject")
INGEST_HINT = ("ingest the images with 'nnssl_ingest --metadata TABLE' (documentation/pretraining.md, \"Metadata at "
               "ingest\"), or unset nnssl_sampling for per-image sampling")


class MissingSubjectError(UserError):
    """Subject-balanced sampling was asked for, but a case's subject is not known."""


def sampling_mode(default: str = "image") -> str:
    """``nnssl_sampling`` (image or subject), ``default`` when unset."""
    raw = text_from_environment(SAMPLING_VARIABLE)
    mode = default if raw is None else raw.lower()
    if mode not in SAMPLING_MODES:
        raise EnvironmentVariableError(f"Environment variable {SAMPLING_VARIABLE}={raw!r}: use 'image' (every "
                                       f"image equally likely, the default) or 'subject' (every subject equally "
                                       f"likely, then one of its images).")
    return mode


@dataclass(frozen=True)
class CaseSubjects:
    """The subject of each case of a dataset, as ``source`` (its nnssl_case_metadata.json) records it."""

    source: str
    subjects: Dict[str, Optional[str]]

    @classmethod
    def of_raw_dataset(cls, nnunet_raw: Optional[str], dataset_name: str) -> "CaseSubjects":
        """The subjects ``nnssl_ingest --metadata`` stored for ``dataset_name`` in ``nnunet_raw``."""
        if not nnunet_raw:
            raise MissingSubjectError(f"{SAMPLING_VARIABLE}=subject reads each case's subject from the raw dataset "
                                      f"({dataset_name}/{CASE_METADATA_FILE}), but nnUNet_raw is not set: set it.")
        raw_dataset_folder = os.path.join(nnunet_raw, dataset_name)
        source = os.path.join(raw_dataset_folder, CASE_METADATA_FILE)
        if not os.path.isfile(source):
            raise MissingSubjectError(f"{SAMPLING_VARIABLE}=subject needs the subject of every case from {source}, "
                                      f"which does not exist: {INGEST_HINT}.")
        cases = load_case_metadata(raw_dataset_folder)
        return cls(source, {case: (entry or {}).get("subject") for case, entry in cases.items()})

    def of(self, cases: Sequence[str]) -> List[str]:
        """The subject of each case, in order; refused when any has none."""
        missing = [case for case in cases if not self.subjects.get(case)]
        if missing:
            examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise MissingSubjectError(f"{SAMPLING_VARIABLE}=subject: {len(missing)} of {len(cases)} cases have no "
                                      f"subject in {self.source} ({examples}). Every case needs one: "
                                      f"{INGEST_HINT}; with a table that has no subject column and paths without "
                                      f"sub-* folders, name the column with --metadata_subject_column.")
        return [self.subjects[case] for case in cases]

    def probabilities(self, cases: Sequence[str]) -> np.ndarray:
        """P(case) = 1 / (n_subjects * n_images of its subject), aligned with ``cases``."""
        subjects = self.of(cases)
        images_of = Counter(subjects)
        weights = np.array([1.0 / images_of[subject] for subject in subjects]) / len(images_of)
        return weights / weights.sum()  # exact sum for numpy's check, whatever the rounding

    def summary(self, cases: Sequence[str]) -> str:
        """One log line: subjects, images, and the largest subject's share of the draws before/after balancing."""
        images_of = Counter(self.of(cases))
        largest, count = max(sorted(images_of.items()), key=lambda item: item[1])
        return (f"{SAMPLING_VARIABLE}=subject: {len(images_of)} subjects, {len(cases)} images (training cases, from "
                f"{self.source}); largest subject {largest} ({count} images): {100 * count / len(cases):.1f} % of "
                f"the draws per image -> {100 / len(images_of):.1f} % subject-balanced")
