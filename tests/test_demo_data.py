"""nnssl_demo_data: determinism, the variety nnssl_ingest must cope with, and a valid labeled nnU-Net dataset."""

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_command
from nnssl.demo.threshold_dice import best_threshold_dice
from nnssl.demo.data import ANATOMY_MASK_FOLDER, LABELED_NAME, UNLABELED_FOLDER, labeled_case, main, write_unlabeled

DEMO_ID = 502


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Dict[str, Path]:
    """One run of the command with its defaults (8 unlabeled volumes, 6 labeled cases, seed 0)."""
    root = tmp_path_factory.mktemp("demo")
    raw = root / "nnUNet_raw"
    raw.mkdir()
    result = run_command(["nnssl_demo_data", "-o", root / "out"], extra_env={"nnUNet_raw": str(raw)})
    return {"out": root / "out", "labeled": raw / f"Dataset{DEMO_ID}_{LABELED_NAME}", "stdout": result.stdout}


def volumes(folder: Path) -> Dict[str, sitk.Image]:
    return {p.name: sitk.ReadImage(str(p)) for p in sorted(folder.iterdir())}


def is_signed_permutation(direction: tuple) -> bool:
    matrix = np.abs(np.array(direction).reshape(3, 3))
    return bool(np.all(np.isclose(matrix, 0) | np.isclose(matrix, 1)))


def test_same_seed_gives_identical_arrays_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_unlabeled(tmp_path / name, 3, seed)
    a, b, c = (volumes(tmp_path / name / UNLABELED_FOLDER) for name in "abc")

    assert list(a) == list(b) == list(c)
    for name in a:
        assert sitk.GetArrayFromImage(a[name]).tobytes() == sitk.GetArrayFromImage(b[name]).tobytes()
        assert (a[name].GetSpacing(), a[name].GetOrigin(), a[name].GetDirection()) == \
               (b[name].GetSpacing(), b[name].GetOrigin(), b[name].GetDirection())
        assert sitk.GetArrayFromImage(a[name]).tobytes() != sitk.GetArrayFromImage(c[name]).tobytes()
    for first, second in zip(labeled_case(5, 1), labeled_case(5, 1)):
        assert sitk.GetArrayFromImage(first).tobytes() == sitk.GetArrayFromImage(second).tobytes()


def test_unlabeled_volumes_mix_formats_spacings_orientations_and_pixel_types(demo):
    images = volumes(demo["out"] / UNLABELED_FOLDER)

    assert len(images) == 8
    assert {name.split(".", 1)[1] for name in images} == {"nii.gz", "nrrd", "mha"}
    assert {image.GetPixelIDTypeAsString() for image in images.values()} == \
        {"16-bit unsigned integer", "16-bit signed integer", "32-bit float"}
    spacings = np.array([image.GetSpacing() for image in images.values()])
    assert spacings.min() >= 0.8 and spacings.max() <= 2.5
    assert any(s.max() / s.min() > 1.5 for s in spacings)  # anisotropic
    assert len({tuple(np.round(s, 3)) for s in spacings}) == 8
    directions = [image.GetDirection() for image in images.values()]
    assert any(d != (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) and is_signed_permutation(d) for d in directions)
    assert any(not is_signed_permutation(d) for d in directions)  # oblique
    assert len({image.GetSize() for image in images.values()}) == 8
    for image in images.values():
        extent = np.array(image.GetSize()) * image.GetSpacing()
        assert np.all((extent >= 60) & (extent <= 110)), extent
        assert np.prod(image.GetSize()) < 120 ** 3
        values = sitk.GetArrayFromImage(image)
        assert values.min() >= -200 and values.max() > values.min()
    maxima = [float(sitk.GetArrayFromImage(image).max()) for image in images.values()]
    assert max(maxima) / min(maxima) > 5  # varied intensity ranges

    masks = volumes(demo["out"] / ANATOMY_MASK_FOLDER)
    assert 0 < len(masks) < len(images)
    for name, mask in masks.items():
        image = images[name]
        assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
               (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        head = sitk.GetArrayFromImage(mask) > 0
        values = sitk.GetArrayFromImage(image).astype(float)
        assert 0.2 < head.mean() < 0.8
        assert values[head].mean() > 3 * np.abs(values[~head]).mean()  # the head is brighter than the air


def test_labeled_dataset_is_a_valid_nnunet_dataset_whose_target_no_threshold_finds(demo):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = demo["labeled"]
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "MRI"}
    assert dataset_json["labels"] == {"background": 0, "ventricles": 1}
    assert dataset_json["numTraining"] == 6 and dataset_json["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"demo_{i:03d}_0000.nii.gz" for i in range(6)]
    for index in range(6):
        image = sitk.ReadImage(str(folder / "imagesTr" / f"demo_{index:03d}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"demo_{index:03d}.nii.gz"))
        assert all(64 <= s <= 96 for s in image.GetSize())
        assert all(0.85 <= s <= 1.25 for s in image.GetSpacing())
        target = sitk.GetArrayFromImage(label) == 1
        values = sitk.GetArrayFromImage(image).astype(float)
        assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}
        assert 0.001 < target.mean() < 0.1
        # CSF-dark, inside the head's intensity range, and no intensity threshold segments them
        assert np.percentile(values[~target], 20) < np.median(values[target]) < np.percentile(values[~target], 80)
        assert best_threshold_dice(values, target) < 0.15
    verify_dataset_integrity(str(folder), num_processes=1)
    assert str(folder) in demo["stdout"]


def test_labeled_dataset_needs_nnunet_raw_and_a_free_id(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    result = run_command(["nnssl_demo_data", "-o", tmp_path / "out"], check=False)
    assert result.returncode == 1 and "nnUNet_raw is not set" in result.stderr
    assert not (tmp_path / "out").exists()  # failed before generating anything

    raw = tmp_path / "raw"
    (raw / "Dataset007_Taken").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert main(["-o", str(tmp_path / "out"), "-d", "7", "--num_unlabeled", "0", "--num_labeled", "1"]) == 1
    assert "Dataset007_Taken" in capsys.readouterr().err
    assert main(["-o", str(tmp_path / "out"), "-d", "8", "--num_unlabeled", "0", "--num_labeled", "1"]) == 0
    assert (raw / f"Dataset008_{LABELED_NAME}" / "labelsTr" / "demo_000.nii.gz").is_file()
