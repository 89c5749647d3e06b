"""nnssl_ingest --metadata: per-case subject/session/modality/quality, the filters and the exclude list, every
excluded image with its reason, bad tables refused with one line naming the file (issue 22, item 1)."""

import json
import os
from pathlib import Path
from typing import Dict

import pytest

from bad_input_helpers import assert_one_line_error
from conftest import run_command
from nnssl.ingest.summary import CASE_METADATA_FILE, SUMMARY_FILE
from test_ingest import file_hashes, textured, write_image

# OpenMind's openneuro_metadata.csv layout (a subset of its columns, in its order of ideas)
OPENMIND_HEADER = "unique_id,image_path,modality,derived_from,image_quality_score,age\n"


def excluded_by_name(folder: Path) -> Dict[str, str]:
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    return {os.path.basename(path): reason for path, reason in summary["excluded"].items()}


def metadata_by_name(folder: Path) -> Dict[str, dict]:
    """Stored metadata per case, keyed by the case's source file name."""
    accepted = json.loads((folder / SUMMARY_FILE).read_text())["accepted"]
    cases = json.loads((folder / CASE_METADATA_FILE).read_text())["cases"]
    assert set(cases) == set(accepted)
    return {os.path.basename(accepted[case]["image"]): entry for case, entry in cases.items()}


def test_openmind_csv_filters_exclude_list_and_stored_metadata(nnunet_dirs, tmp_path):
    sources = tmp_path / "sources"
    root = sources / "OpenMind"
    for seed, relative in enumerate(["ds001/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                     "ds001/sub-02/anat/sub-02_T2w.nii.gz", "ds002/sub-01/anat/sub-01_FLAIR.nii.gz",
                                     "ds002/sub-03/anat/sub-03_T1w.nii.gz", "ds002/sub-04/anat/sub-04_T1w.nii.gz",
                                     "ds002/sub-07/anat/sub-07_T1w.nii.gz", "ds003/sub-05/anat/sub-05_T1w.nii.gz",
                                     "ds003/sub-06/anat/sub-06_T1w.nii.gz"]):
        write_image(root / relative, textured(seed=seed))
    table = sources / "openneuro_metadata.csv"
    table.write_text(OPENMIND_HEADER
                     + "ds001_1,ds001/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz,T1w,,1.25,31\n"
                       "ds001_2,ds001/sub-02/anat/sub-02_T2w.nii.gz,T2w,,2.0,\n"
                       "ds002_1,ds002/sub-01/anat/sub-01_FLAIR.nii.gz,FLAIR,,1.0,40\n"
                       "ds002_3,ds002/sub-03/anat/sub-03_T1w.nii.gz,T1w,,3.5,\n"
                       "ds002_4,ds002/sub-04/anat/sub-04_T1w.nii.gz,T1w,,,\n"
                       "ds002_7,ds002/sub-07/anat/sub-07_T1w.nii.gz,T1w,,0.5,\n"
                       "ds003_6,ds003/sub-06/anat/sub-06_T1w.nii.gz,T1w,,1.0,\n"
                       "ds009_9,ds009/sub-09/anat/sub-09_T1w.nii.gz,T1w,,1.0,\n")
    exclude = sources / "exclude.txt"
    exclude.write_text("# reviewed by hand\nds003/sub-06/anat/sub-06_T1w.nii.gz\nds003/sub-99/gone.nii.gz\n")
    before = file_hashes(sources)

    result = run_command(["nnssl_ingest", "-i", root, "-d", 501, "-n", "OpenMind", "-np", 1, "--metadata", table,
                          "--modality", "T1w", "T2w", "--min_quality", 1.0, "--max_quality", 3.0,
                          "--exclude_list", exclude])

    folder = nnunet_dirs["nnUNet_raw"] / "Dataset501_OpenMind"
    assert "2 accepted (2 written" in result.stdout and "6 excluded" in result.stdout, result.stdout
    where = f"of {table}"
    assert excluded_by_name(folder) == {
        "sub-01_FLAIR.nii.gz": f"modality 'FLAIR' (line 4 {where}) is not one of --modality T1w T2w",
        "sub-03_T1w.nii.gz": f"quality score 3.5 (line 5 {where}) is above --max_quality 3",
        "sub-04_T1w.nii.gz": f"no quality score (line 6 {where}), needed by --min_quality",
        "sub-07_T1w.nii.gz": f"quality score 0.5 (line 7 {where}) is below --min_quality 1",
        "sub-05_T1w.nii.gz": f"no row in the metadata table {table}",
        "sub-06_T1w.nii.gz": f"in the exclude list {exclude} (line 2)"}
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert summary["metadata"]["rows_without_image"] == ["line 9: ds009/sub-09/anat/sub-09_T1w.nii.gz"]
    assert summary["metadata"]["exclude_list_entries_without_image"] == ["line 3: ds003/sub-99/gone.nii.gz"]
    assert summary["last_run"] == {"written": 2, "skipped": 0, "rejected": 0, "excluded": 6}
    assert metadata_by_name(folder) == {
        "sub-01_ses-1_T1w.nii.gz": {"subject": "ds001/sub-01", "session": "ses-1", "modality": "T1w",
                                    "quality": 1.25},
        "sub-02_T2w.nii.gz": {"subject": "ds001/sub-02", "session": None, "modality": "T2w", "quality": 2.0}}
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    assert file_hashes(sources) == before

    # a rerun with a stricter filter takes the case out of the dataset and says why
    run_command(["nnssl_ingest", "-i", root, "-d", 501, "-n", "OpenMind", "-np", 1, "--metadata", table,
                 "--modality", "T1w", "--exclude_list", exclude])

    assert set(metadata_by_name(folder)) == {"sub-01_ses-1_T1w.nii.gz", "sub-03_T1w.nii.gz", "sub-04_T1w.nii.gz",
                                             "sub-07_T1w.nii.gz"}
    assert excluded_by_name(folder)["sub-02_T2w.nii.gz"].startswith("modality 'T2w'")
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 4


def test_tsv_with_named_columns_matched_by_file_name_reports_ambiguity(nnunet_dirs, tmp_path):
    for folder in ("site_a", "site_b"):
        write_image(tmp_path / folder / "same.nii.gz", textured())
    write_image(tmp_path / "site_a" / "alone.mha", textured(seed=1))
    write_image(tmp_path / "site_b" / "other.nrrd", textured(seed=2))
    table = tmp_path / "meta.tsv"
    table.write_text("file\tparticipant\tvisit\tcontrast\tscore\n"
                     "alone.mha\tP1\tV1\tT1w\t0.9\n"
                     "same.nii.gz\tP2\tV1\tT1w\t0.8\n"
                     "other.nrrd\tP3\t\tT2w\t0.7\n"
                     "other.nrrd\tP4\t\tT2w\t0.6\n")

    run_command(["nnssl_ingest", "-i", tmp_path / "site_a", tmp_path / "site_b", "-d", 502, "-n", "Sites",
                 "-np", 1, "--metadata", table, "--metadata_match", "name", "--metadata_image_column", "file",
                 "--metadata_subject_column", "participant", "--metadata_session_column", "visit",
                 "--metadata_modality_column", "contrast", "--metadata_quality_column", "score"])

    folder = nnunet_dirs["nnUNet_raw"] / "Dataset502_Sites"
    excluded = excluded_by_name(folder)
    assert excluded == {
        "same.nii.gz": f"ambiguous metadata: line 3 of {table} matches several images (--metadata_match name)",
        "other.nrrd": f"ambiguous metadata: lines 4, 5 of {table} all match this image (--metadata_match name)"}
    assert len(json.loads((folder / SUMMARY_FILE).read_text())["excluded"]) == 3  # both same.nii.gz
    assert metadata_by_name(folder) == {"alone.mha": {"subject": "P1", "session": "V1", "modality": "T1w",
                                                      "quality": 0.9}}


@pytest.mark.parametrize("case", ["missing_column", "unreadable", "not_a_number", "old_modality"])
def test_bad_tables_and_options_are_one_line_errors_naming_the_file(nnunet_dirs, tmp_path, case):
    write_image(tmp_path / "in" / "ds1" / "sub-1" / "a.nii.gz", textured())
    table = tmp_path / "table.csv"
    table.write_text(OPENMIND_HEADER + "u,ds1/sub-1/a.nii.gz,T1w,,1.0,\n")
    options, fragments = {
        "missing_column": (["--metadata", table, "--metadata_subject_column", "participant_id"],
                           [str(table), "has no column 'participant_id'", "--metadata_subject_column"]),
        "unreadable": (["--metadata", tmp_path / "missing.csv"],
                       [str(tmp_path / "missing.csv"), "cannot be read"]),
        "not_a_number": (["--metadata", table, "--metadata_quality_column", "modality"],
                         [str(table), "line 2", "'T1w' in column 'modality' is not a number"]),
        "old_modality": (["--modality", "CT"], ["--modality CT", "needs --metadata TABLE", "--channel_name"]),
    }[case]
    before = file_hashes(tmp_path)

    result = run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", 503, "-n", "Bad", *options], check=False)

    assert_one_line_error(result, *fragments)
    assert not list(nnunet_dirs["nnUNet_raw"].iterdir())
    assert file_hashes(tmp_path) == before
