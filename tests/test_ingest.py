"""nnssl_ingest: validation and rejection reasons, exact copies, placeholder labels, re-runs, errors, end to end."""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_command
from nnssl.ingest import IngestError, IngestReport, ingest
from nnssl.ingest.cli import main as ingest_main
from nnssl.ingest.discover import case_identifier, discover
from nnssl.ingest.summary import LABEL_SEMANTICS, SUMMARY_FILE

_X, _Z = np.radians(10), np.radians(-7)
OBLIQUE = tuple((np.array([[1, 0, 0], [0, np.cos(_X), -np.sin(_X)], [0, np.sin(_X), np.cos(_X)]])
                 @ np.array([[np.cos(_Z), -np.sin(_Z), 0], [np.sin(_Z), np.cos(_Z), 0], [0, 0, 1]])).ravel())


def write_image(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                origin: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None,
                is_vector: bool = False) -> Path:
    """Write ``array`` (z, y, x order) with the given geometry; returns the path."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    dimension = image.GetDimension()
    image.SetSpacing(list(spacing)[:dimension] + [1.0] * (dimension - len(spacing)))
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def textured(shape: Sequence[int] = (20, 22, 24), dtype: type = np.int16, seed: int = 0) -> np.ndarray:
    """A small non-constant volume."""
    return (np.random.default_rng(seed).random(shape) * 1000).astype(dtype)


def file_hashes(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder`` (also records mtimes, which must not change either)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dataset_folder(nnunet_dirs: Dict[str, Path], dataset_id: int, name: str) -> Path:
    return nnunet_dirs["nnUNet_raw"] / f"Dataset{dataset_id:03d}_{name}"


def run_ingest(inputs: Sequence[Path] = (), **kwargs) -> IngestReport:
    kwargs.setdefault("num_processes", 1)
    kwargs.setdefault("progress", False)
    return ingest(kwargs.pop("dataset_id", 501), kwargs.pop("dataset_name", "Test"), inputs, **kwargs)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def case_of(report: IngestReport, source: Path) -> str:
    """The case id written for ``source``."""
    case_id = case_identifier(os.path.realpath(source))
    assert case_id in report.written + report.skipped
    return case_id


def output_image(folder: Path, case_id: str) -> sitk.Image:
    return sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))


def output_label(folder: Path, case_id: str) -> sitk.Image:
    return sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))


def assert_same_geometry(actual: sitk.Image, expected: sitk.Image) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), atol=1e-6)


def test_each_rejection_reason_is_recorded_and_good_files_still_ingested(nnunet_dirs, tmp_path):
    inputs, masks = tmp_path / "sources" / "inputs", tmp_path / "sources" / "masks"
    good = [write_image(inputs / "good_a.nii.gz", textured()),
            write_image(inputs / "sub" / "good_b.mha", textured(dtype=np.float32), spacing=(0.8, 0.8, 2.0)),
            write_image(inputs / "good_masked.nrrd", textured())]
    head = np.zeros((20, 22, 24), np.uint8)
    head[5:15, 5:15, 5:15] = 1
    write_image(masks / "good_masked.nrrd", head)
    nan, inf = textured(dtype=np.float32), textured(dtype=np.float32)
    nan[3, 4, 5], inf[1, 2, 3] = np.nan, np.inf
    (inputs / "corrupt.nii.gz").write_bytes(b"this is not an image" * 50)
    write_image(inputs / "flat.nii.gz", textured((30, 30)))
    write_image(inputs / "movie.nii.gz", textured((3, 20, 22, 24)))
    write_image(inputs / "rgb.mha", textured((20, 22, 24, 3)), is_vector=True)
    write_image(inputs / "nan.nrrd", nan)
    write_image(inputs / "nan.nii.gz", nan)  # ITK's NIfTI reader would silently read NaN/inf as 0
    write_image(inputs / "inf.nii", inf)
    write_image(inputs / "inf.mha", inf)
    write_image(inputs / "constant.nii.gz", np.full((20, 22, 24), 7, np.int16))
    write_image(inputs / "small.nii.gz", textured((10, 40, 40)))  # 10 mm < 16 mm along z
    for name in ("wrong_size.nii.gz", "wrong_grid.nii.gz", "empty_mask.nii.gz"):
        write_image(inputs / name, textured())
    write_image(masks / "wrong_size.nii.gz", np.ones((19, 22, 24), np.uint8))
    write_image(masks / "wrong_grid.nii.gz", np.ones((20, 22, 24), np.uint8), spacing=(1.0, 1.0, 1.5))
    write_image(masks / "empty_mask.nii.gz", np.zeros((20, 22, 24), np.uint8))
    expected = {
        "corrupt.nii.gz": "unreadable: ",
        "flat.nii.gz": "not 3D: 2D image",
        "movie.nii.gz": "not 3D: 4D image",
        "rgb.mha": "not a scalar image: 3 components per voxel",
        "nan.nrrd": "NaN voxels: 1 of 10560",
        "inf.mha": "infinite voxels: 1 of 10560",
        "nan.nii.gz": "NaN voxels: 1 of 10560",
        "inf.nii": "infinite voxels: 1 of 10560",
        "constant.nii.gz": "constant image: every voxel is 7",
        "small.nii.gz": "too small: physical extent 40.0 x 40.0 x 10.0 mm",
        "wrong_size.nii.gz": "anatomy mask size (24, 22, 19) differs from image size (24, 22, 20)",
        "wrong_grid.nii.gz": "anatomy mask geometry differs from the image: spacing",
        "empty_mask.nii.gz": "anatomy mask is empty",
    }
    before = file_hashes(tmp_path / "sources")

    report = run_ingest([inputs], anatomy_masks=masks, num_processes=2)

    folder = dataset_folder(nnunet_dirs, 501, "Test")
    summary = load_json(folder / SUMMARY_FILE)
    reasons = {os.path.basename(path): reason for path, reason in summary["rejected"].items()}
    assert set(reasons) == set(expected)
    for name, phrase in expected.items():
        assert reasons[name].startswith(phrase), (name, reasons[name])
    assert {os.path.basename(p) for p in report.rejected} == set(expected)
    assert sorted(os.path.basename(e["image"]) for e in summary["accepted"].values()) == \
        ["good_a.nii.gz", "good_b.mha", "good_masked.nrrd"]
    assert summary["last_run"] == {"written": 3, "skipped": 0, "rejected": len(expected), "excluded": 0}
    assert load_json(folder / "dataset.json")["numTraining"] == 3 == report.num_cases
    assert sorted(os.listdir(folder / "imagesTr")) == sorted(f"{case_of(report, p)}_0000.nii.gz" for p in good)
    assert not [name for name in os.listdir(folder) if name.startswith(".")]  # no temp folder left
    assert file_hashes(tmp_path / "sources") == before


def test_geometry_pixel_type_and_voxel_values_are_preserved(nnunet_dirs, tmp_path):
    inputs = tmp_path / "inputs"
    sources = [
        write_image(inputs / "oblique.nrrd", textured(dtype=np.uint16), (0.83, 0.91, 2.4), (-12.5, 40.25, 7.125),
                    OBLIQUE),
        write_image(inputs / "flipped.nii.gz", textured(dtype=np.int16) - 300, (1.1, 1.1, 1.1), (90.0, 126.0, -72.0),
                    (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
        write_image(inputs / "permuted.mha", textured(dtype=np.float32) / 7, (2.5, 0.9, 0.9), (1.0, 2.0, 3.0),
                    (0, 0, -1, 1, 0, 0, 0, -1, 0)),
        write_image(inputs / "detached.mhd", textured(dtype=np.float64) / 3, (1.0, 1.25, 1.5)),
    ]
    assert (inputs / "detached.raw").exists() or (inputs / "detached.zraw").exists()

    report = run_ingest([inputs])

    folder = dataset_folder(nnunet_dirs, 501, "Test")
    assert len(report.written) == 4 and not report.rejected
    for source_path in sources:
        source = sitk.ReadImage(str(source_path))
        case_id = case_of(report, source_path)
        image, label = output_image(folder, case_id), output_label(folder, case_id)
        assert image.GetPixelID() == source.GetPixelID()
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(source))
        assert_same_geometry(image, source)
        assert label.GetPixelID() == sitk.sitkUInt8
        assert (image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == \
               (label.GetSpacing(), label.GetOrigin(), label.GetDirection())
        assert np.all(sitk.GetArrayViewFromImage(label) == 1)  # no anatomy mask: the whole image is anatomy


def test_label_encoding_with_anatomy_and_anonymization_masks_from_a_tsv(nnunet_dirs, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    data = tmp_path / "data"
    geometry = dict(spacing=(1.2, 1.0, 0.9), origin=(5.0, -3.0, 11.0), direction=OBLIQUE)
    write_image(data / "img" / "head.nii.gz", textured(), **geometry)
    write_image(data / "img" / "plain.mha", textured(seed=1), **geometry)
    anatomy = np.zeros((20, 22, 24), np.uint8)
    anatomy[:, :, :12] = 1
    anonymised = np.zeros((20, 22, 24), np.uint8)
    anonymised[:4] = 1  # covers voxels inside and outside the anatomy
    write_image(data / "anat" / "head.nii.gz", anatomy * 3, **geometry)  # any value > 0 counts
    write_image(data / "anon" / "head.nii.gz", anonymised, **geometry)
    (data / "list.tsv").write_text("image\tsubject\tanatomy_mask\tanonymization_mask\n"
                                   "img/head.nii.gz\ts1\tanat/head.nii.gz\tanon/head.nii.gz\n"
                                   "img/plain.mha\ts2\t\t\n")

    report = run_ingest(list_file=data / "list.tsv")

    folder = dataset_folder(nnunet_dirs, 501, "Test")
    expected = np.where(anonymised > 0, 2, np.where(anatomy > 0, 1, 0))
    label = sitk.GetArrayFromImage(output_label(folder, case_of(report, data / "img" / "head.nii.gz")))
    assert np.array_equal(label, expected)
    assert set(np.unique(label)) == {0, 1, 2}
    assert np.all(sitk.GetArrayFromImage(output_label(folder, case_of(report, data / "img" / "plain.mha"))) == 1)
    dataset_json = load_json(folder / "dataset.json")
    assert dataset_json["labels"] == {"background": 0, "anatomy": 1, "anonymised": 2}
    assert dataset_json["nnssl"] == {"unlabeled": True, "label_semantics": LABEL_SEMANTICS,
                                     "anatomy_masks": True, "anonymization_masks": True}
    accepted = load_json(folder / SUMMARY_FILE)["accepted"]
    head = accepted[case_of(report, data / "img" / "head.nii.gz")]
    assert head["anatomy_mask"] == os.path.realpath(data / "anat" / "head.nii.gz")
    assert head["anonymization_mask"] == os.path.realpath(data / "anon" / "head.nii.gz")
    verify_dataset_integrity(str(folder), num_processes=1)


def test_dataset_json_without_masks(nnunet_dirs, tmp_path):
    write_image(tmp_path / "in" / "a.nii.gz", textured())
    write_image(tmp_path / "in" / "b.nii.gz", textured(seed=2))

    run_ingest([tmp_path / "in"], dataset_id=7, dataset_name="Brains", channel_name="T1")

    dataset_json = load_json(dataset_folder(nnunet_dirs, 7, "Brains") / "dataset.json")
    assert dataset_json["channel_names"] == {"0": "T1"}
    assert dataset_json["labels"] == {"background": 0, "anatomy": 1}
    assert dataset_json["numTraining"] == 2
    assert dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["nnssl"] == {
        "unlabeled": True,
        "label_semantics": "1 = anatomy (whole image where no anatomy mask was given), 2 = anonymised; "
                           "placeholder labels for nnU-Net, not a segmentation",
        "anatomy_masks": False, "anonymization_masks": False}


def test_rerun_skips_unchanged_cases_adds_new_files_and_redoes_changed_ones(nnunet_dirs, tmp_path):
    inputs = tmp_path / "in"
    first = write_image(inputs / "first.nii.gz", textured())
    second = write_image(inputs / "second.nrrd", textured(seed=1))
    folder = dataset_folder(nnunet_dirs, 501, "Test")
    report = run_ingest([inputs])
    assert len(report.written) == 2
    outputs = {p: p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")}

    report = run_ingest([inputs])
    assert (report.written, len(report.skipped), report.rejected) == ([], 2, {})
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")} == outputs
    assert load_json(folder / SUMMARY_FILE)["last_run"] == {"written": 0, "skipped": 2, "rejected": 0, "excluded": 0}

    third = write_image(inputs / "later" / "third.mha", textured(seed=3))
    (folder / ".nnssl_ingest_tmp_killed").mkdir()  # as a killed run would leave it
    (folder / ".nnssl_ingest_tmp_killed" / "x_0000.nii.gz").write_bytes(b"half")
    report = run_ingest([inputs])
    assert report.written == [case_of(report, third)] and len(report.skipped) == 2
    assert load_json(folder / "dataset.json")["numTraining"] == 3
    assert not (folder / ".nnssl_ingest_tmp_killed").exists()

    write_image(first, textured(seed=9))  # new content: the case must be redone
    report = run_ingest([inputs])
    assert report.written == [case_of(report, first)] and len(report.skipped) == 2
    assert np.array_equal(sitk.GetArrayFromImage(output_image(folder, case_of(report, first))), textured(seed=9))

    second.write_bytes(b"corrupted")  # a source that turned invalid takes its stale case with it
    report = run_ingest([inputs])
    assert list(report.rejected) == [os.path.realpath(second)]
    assert not (folder / "imagesTr" / f"{case_identifier(os.path.realpath(second))}_0000.nii.gz").exists()
    assert load_json(folder / "dataset.json")["numTraining"] == 2
    assert len(load_json(folder / SUMMARY_FILE)["accepted"]) == 2


def test_case_identifiers_are_stable_unique_and_valid_nnunet_names(tmp_path):
    names = [tmp_path / "a" / "sub 01.T1w_0000.nii.gz", tmp_path / "b" / "sub 01.T1w_0000.nii.gz",
             tmp_path / "a" / "x.y.z.mha", tmp_path / "a" / "...nrrd"]
    ids = [case_identifier(str(p)) for p in names]
    assert len(set(ids)) == len(ids)
    assert ids == [case_identifier(str(p)) for p in names]
    for case_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9-]+_[0-9a-f]{8}", case_id), case_id
        assert not re.search(r"_\d{4}$", case_id.rsplit("_", 1)[0])
    assert ids[0].startswith("sub-01-T1w-0000_")


def test_masks_are_matched_by_relative_path_then_by_unique_stem(tmp_path):
    for path in ["in/a/x.nii.gz", "in/b/x.nii.gz", "in/c/y.nrrd", "in/z.nii.gz", "in/lonely.mha",
                 "masks/a/x.nii.gz", "masks/b/x.mha", "masks/deep/er/y.nii.gz",
                 "masks/p/z.nii.gz", "masks/q/z.nii.gz", "in/.hidden.nii.gz", "in/notes.txt"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")

    found = discover([tmp_path / "in"], anatomy_masks=tmp_path / "masks")

    pairs = {os.path.relpath(s.image, tmp_path): s.anatomy_mask and os.path.relpath(s.anatomy_mask, tmp_path)
             for s in found.sources}
    assert pairs == {"in/a/x.nii.gz": "masks/a/x.nii.gz", "in/b/x.nii.gz": "masks/b/x.mha",
                     "in/c/y.nrrd": "masks/deep/er/y.nii.gz", "in/lonely.mha": None}
    assert [os.path.relpath(p, tmp_path) for p in found.rejected] == ["in/z.nii.gz"]
    assert "ambiguous anatomy mask: 2 candidates" in found.rejected[str(tmp_path / "in" / "z.nii.gz")]
    # masks kept inside the input folder are not ingested as images
    inside = discover([tmp_path], anatomy_masks=tmp_path / "masks")
    assert not [s for s in inside.sources if "/masks/" in s.image]


def test_plain_list_file_and_duplicates(nnunet_dirs, tmp_path):
    a = write_image(tmp_path / "data" / "a.nii.gz", textured())
    b = write_image(tmp_path / "data" / "b.mha", textured(seed=1))
    (tmp_path / "data" / "list.txt").write_text(f"# my images\n\na.nii.gz\n{b}\n  a.nii.gz  \n")

    report = run_ingest([tmp_path / "data"], list_file=tmp_path / "data" / "list.txt")

    assert sorted(report.written) == sorted([case_of(report, a), case_of(report, b)])


def test_dataset_id_used_by_another_name_is_an_error(nnunet_dirs, tmp_path):
    write_image(tmp_path / "in" / "a.nii.gz", textured())
    (nnunet_dirs["nnUNet_raw"] / "Dataset501_Other").mkdir()

    with pytest.raises(IngestError, match="Dataset501_Other"):
        run_ingest([tmp_path / "in"], dataset_id=501, dataset_name="Mine")
    result = run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", "501", "-n", "Mine"], check=False)

    assert result.returncode == 1
    assert "Dataset ID 501 is already used" in result.stderr and "Dataset501_Other" in result.stderr
    assert not dataset_folder(nnunet_dirs, 501, "Mine").exists()


def test_missing_nnunet_raw_is_an_error_naming_the_variable(nnunet_dirs, tmp_path, monkeypatch):
    write_image(tmp_path / "in" / "a.nii.gz", textured())
    monkeypatch.delenv("nnUNet_raw")

    with pytest.raises(IngestError, match="nnUNet_raw is not set"):
        run_ingest([tmp_path / "in"])
    result = run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", "501", "-n", "Mine"], check=False)

    assert result.returncode == 1 and "nnUNet_raw is not set" in result.stderr


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ingest_main(["-h"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("-i DIR", "-l LIST_FILE", "--anatomy_masks DIR", "--anonymization_masks DIR", "-d ID", "-n NAME",
                 "-np N", "--channel_name", "--modality", "--metadata TABLE", "--min_extent_mm", "-v", "relative path", "file stem", "2 = anonymised"):
        assert flag in text, flag


def test_demo_data_through_the_command_line_ingests_and_passes_nnunet_checks(nnunet_dirs, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    demo = tmp_path / "demo"
    run_command(["nnssl_demo_data", "-o", demo, "--num_unlabeled", "5", "--num_labeled", "0", "--seed", "1"])
    before = file_hashes(demo)

    # the parent folder is given: the masks inside it must be used as masks, not ingested as images
    result = run_command(["nnssl_ingest", "-i", demo, "--anatomy_masks", demo / "unlabeled_masks" / "anatomy",
                          "-d", "501", "-n", "DemoUnlabeled", "-np", "2"])

    folder = dataset_folder(nnunet_dirs, 501, "DemoUnlabeled")
    assert "5 accepted (5 written, 0 unchanged and skipped), 0 rejected" in result.stdout
    assert str(folder / SUMMARY_FILE) in result.stdout
    assert file_hashes(demo) == before
    accepted = load_json(folder / SUMMARY_FILE)["accepted"]
    with_mask = [case for case, entry in accepted.items() if entry["anatomy_mask"]]
    assert len(accepted) == 5 and len(with_mask) == 3
    for case_id in accepted:
        values = set(np.unique(sitk.GetArrayFromImage(output_label(folder, case_id))))
        assert values == ({0, 1} if case_id in with_mask else {1})
    verify_dataset_integrity(str(folder), num_processes=1)

    run_command(["nnUNetv2_extract_fingerprint", "-d", "501", "-np", "1"])

    fingerprint = load_json(nnunet_dirs["nnUNet_preprocessed"] / folder.name / "dataset_fingerprint.json")
    assert len(fingerprint["spacings"]) == 5
