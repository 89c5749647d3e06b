"""nnssl_sampling=subject: the pretraining loaders draw a subject first, then one of its images (issue 22); the
subjects come from nnssl_ingest --metadata; missing subjects are refused with what to do.

The user's path end to end (nnssl_ingest --metadata, then one tiny S3DPretrainTrainer epoch through nnUNetv2_train
whose log must show the balancing line with its numbers) is the runnable block of documentation/pretraining.md,
"Subject-balanced sampling", which test_documentation runs on the laptop run's data (19 s there, against 81 s for a
test of its own that has to plan and preprocess a dataset first)."""

import json
import math
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from nnssl.ingest.summary import CASE_METADATA_FILE
from nnssl.integration.environment import EnvironmentVariableError
from nnssl.integration.pretraining_loader import PretrainingDataLoader
from nnssl.integration.subject_sampling import CaseSubjects, MissingSubjectError, sampling_mode

# one subject scanned 8 times, three scanned once
SKEWED = {**{f"big_{i}": "ds1/sub-big" for i in range(8)}, "a_0": "ds1/sub-a", "b_0": "ds1/sub-b", "c_0": "ds2/sub-c"}


def skewed_subjects() -> CaseSubjects:
    return CaseSubjects("meta.json", dict(SKEWED))


def loader(case_subjects=None, seed: int = 0) -> PretrainingDataLoader:
    """The pretraining loader over the skewed cases; only its case drawing is used (nothing is read)."""
    cases = list(SKEWED)
    random.Random(seed).shuffle(cases)  # the dataset's order must not matter
    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    return PretrainingDataLoader(SimpleNamespace(identifiers=cases), 2, (8, 8, 8), (8, 8, 8), labels,
                                 case_subjects=case_subjects, shared_batches=False)


def subject_frequencies(data_loader: PretrainingDataLoader, batches: int) -> Counter:
    np.random.seed(0)
    draws = [case for _ in range(batches) for case in data_loader.get_indices()]
    return Counter(SKEWED[case] for case in draws)


def test_probabilities_are_one_over_subjects_times_their_images():
    cases = list(SKEWED)
    p = dict(zip(cases, skewed_subjects().probabilities(cases)))
    assert p["big_3"] == pytest.approx(1 / (4 * 8)) and p["a_0"] == pytest.approx(1 / 4)
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-12)
    # every rank, whatever order its dataset lists the cases in, gives each case the same probability
    reordered = cases[::-1]
    assert dict(zip(reordered, skewed_subjects().probabilities(reordered))) == pytest.approx(p)
    assert skewed_subjects().summary(cases) == (
        "nnssl_sampling=subject: 4 subjects, 11 images (training cases, from meta.json); largest subject ds1/sub-big "
        "(8 images): 72.7 % of the draws per image -> 25.0 % subject-balanced")


@pytest.mark.parametrize("balanced", [True, False])
def test_the_loader_draws_subjects_equally_often_only_when_asked(balanced):
    """600 draws from the real loader: each subject's frequency within 4 binomial standard deviations of its share
    (1/4 each when balanced; 8/11 and 1/11 per image). 4 sd: a correct loader fails one subject in ~16000; a loader
    that ignored the setting would be off by 0.48 (28 sd) for the big subject."""
    draws = 300 * 2
    frequencies = subject_frequencies(loader(skewed_subjects() if balanced else None), 300)
    images = Counter(SKEWED.values())
    for subject, count in images.items():
        share = 1 / len(images) if balanced else count / len(SKEWED)
        tolerance = 4 * math.sqrt(share * (1 - share) / draws)
        assert abs(frequencies[subject] / draws - share) < tolerance, (subject, frequencies)


def test_missing_metadata_and_subjects_are_refused_with_what_to_do(tmp_path, monkeypatch):
    dataset = tmp_path / "Dataset001_X"
    dataset.mkdir()
    with pytest.raises(MissingSubjectError) as error:
        CaseSubjects.of_raw_dataset(str(tmp_path), "Dataset001_X")
    assert f"{dataset / CASE_METADATA_FILE}, which does not exist" in str(error.value)
    assert "nnssl_ingest --metadata TABLE" in str(error.value)

    (dataset / CASE_METADATA_FILE).write_text(json.dumps({"cases": {
        "c1": {"subject": "ds1/sub-01", "session": None, "modality": "T1w", "quality": None},
        "c2": {"subject": None, "session": None, "modality": "T1w", "quality": None}}}))
    subjects = CaseSubjects.of_raw_dataset(str(tmp_path), "Dataset001_X")
    with pytest.raises(MissingSubjectError, match=r"2 of 3 cases have no subject in .*nnssl_case_metadata.json "
                                                  r"\(c2, c3\)\. Every case needs one: ingest .*--metadata"):
        subjects.probabilities(["c1", "c2", "c3"])

    monkeypatch.setenv("nnssl_sampling", "subjects")
    with pytest.raises(EnvironmentVariableError, match="nnssl_sampling='subjects': use 'image'"):
        sampling_mode()
    monkeypatch.setenv("nnssl_sampling", "Subject")
    assert sampling_mode() == "subject"
    monkeypatch.delenv("nnssl_sampling")
    assert sampling_mode() == "image"
