"""Bad input at ingest and fine-tuning preparation, through the commands: each is rejected with one line naming the
file, no user file changes, and nothing is left that a rerun cannot complete (issue 19)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from bad_input_helpers import (COMMAND_TIMEOUT, assert_one_line_error, dataset_is_consistent, staging_leftovers,
                               unwritable)
from conftest import console_script, run_command
from nnssl.ingest.cli import main as ingest_main
from nnssl.ingest.discover import case_identifier
from nnssl.ingest.summary import SUMMARY_FILE
from test_ingest import file_hashes, run_ingest, textured, write_image

SHAPE = (24, 24, 24)
FORMATS = {"nii": (".nii", False), "nii_gz": (".nii.gz", True), "nrrd": (".nrrd", False),
           "nrrd_gz": (".nrrd", True), "mha": (".mha", False), "mha_z": (".mha", True), "mhd": (".mhd", False),
           "mhd_z": (".mhd", True)}
CUTS = (0.05, 0.5, 0.9, 0.999)


def summary_of(folder: Path) -> dict:
    return json.loads((folder / SUMMARY_FILE).read_text())


def reasons_by_name(folder: Path) -> dict:
    return {os.path.basename(path): reason for path, reason in summary_of(folder)["rejected"].items()}


def detached_data_file(header: Path) -> Path:
    line = next(line for line in header.read_text().splitlines() if line.startswith("ElementDataFile"))
    return header.parent / line.split("=", 1)[1].strip()


def cut_copy(source: Path, target: Path, fraction: float) -> None:
    """``target``: ``source`` with its voxel data cut to ``fraction`` of its bytes (a .mhd keeps its header and gets
    a cut copy of its data file)."""
    data = detached_data_file(source) if source.suffix == ".mhd" else source
    content = data.read_bytes()[:int(data.stat().st_size * fraction)]
    if source.suffix != ".mhd":
        target.write_bytes(content)
        return
    cut_data = target.with_name(target.stem + data.suffix)
    cut_data.write_bytes(content)
    target.write_text(source.read_text().replace(f"= {data.name}", f"= {cut_data.name}"))


def test_truncated_and_corrupt_volumes_of_every_format_are_rejected(nnunet_dirs, tmp_path):
    inputs, originals = tmp_path / "inputs", tmp_path / "originals"
    inputs.mkdir()
    originals.mkdir()
    image = sitk.GetImageFromArray(textured(SHAPE))
    for name, (extension, compressed) in FORMATS.items():
        original = originals / f"{name}{extension}"
        sitk.WriteImage(image, str(original), compressed)
        for fraction in CUTS:
            cut_copy(original, inputs / f"{name}_cut{fraction * 100:g}{extension}", fraction)
    corrupt = bytearray((originals / "nii_gz.nii.gz").read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (inputs / "flipped_byte.nii.gz").write_bytes(bytes(corrupt))
    shutil.copy(originals / "nii_gz.nii.gz", inputs / "complete.nii.gz")
    before = file_hashes(inputs)

    result = run_command(["nnssl_ingest", "-i", inputs, "-d", 501, "-n", "Cut", "-np", 1], check=False)

    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset501_Cut"
    reasons = reasons_by_name(folder)
    truncated = {f"{name}_cut{fraction * 100:g}{extension}" for name, (extension, _) in FORMATS.items()
                 for fraction in CUTS}
    assert set(reasons) == truncated | {"flipped_byte.nii.gz"}
    for name in truncated:
        assert reasons[name].startswith("truncated: "), (name, reasons[name])
    assert reasons["flipped_byte.nii.gz"].startswith("corrupt: the gzip voxel data of flipped_byte.nii.gz")
    assert dataset_is_consistent(folder) == 1
    assert file_hashes(inputs) == before


def nifti_with_pixdim(path: Path, value: float) -> Path:
    image = nibabel.Nifti1Image(textured(SHAPE), np.eye(4))
    image.header["pixdim"][2] = value
    nibabel.save(image, str(path))
    return path


def metaimage_with_spacing(path: Path, spacing: str) -> Path:
    write_image(path, textured(SHAPE))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}".encode()))
    return path


def test_invalid_header_spacings_are_rejected_naming_the_file_unless_the_flag_fixes_them(nnunet_dirs, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nifti_with_pixdim(inputs / "zero.nii.gz", 0.0)
    nifti_with_pixdim(inputs / "negative.nii", -2.0)
    nifti_with_pixdim(inputs / "nan.nii.gz", float("nan"))
    metaimage_with_spacing(inputs / "zero.mha", "1 0 1")
    metaimage_with_spacing(inputs / "negative.mha", "1 1 -3")
    nrrd = write_image(inputs / "zero.nrrd", textured(SHAPE))
    nrrd.write_bytes(nrrd.read_bytes().replace(b"(0,1,0)", b"(0,0,0)"))
    before = file_hashes(inputs)
    command = ["nnssl_ingest", "-i", inputs, "-d", 502, "-n", "Spacing", "-np", 1]

    refused = run_command(command, check=False)

    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert not (nnunet_dirs["nnUNet_raw"] / "Dataset502_Spacing").exists()  # every file rejected: no dataset
    for name in os.listdir(inputs):
        line = next(line for line in refused.stdout.splitlines() if f"rejected {inputs / name}: " in line)
        assert "invalid spacing: the header's " in line and "--fix_bad_spacing" in line, line

    fixed = run_command(command + ["--fix_bad_spacing"], check=False)

    folder = nnunet_dirs["nnUNet_raw"] / "Dataset502_Spacing"
    summary = summary_of(folder)
    written = {os.path.basename(entry["image"]): case for case, entry in summary["accepted"].items()}
    assert fixed.returncode == 0 and set(written) == {"zero.nii.gz", "negative.nii", "nan.nii.gz", "negative.mha"}
    assert set(summary["corrected"]) == set(written.values())
    spacing = sitk.ReadImage(str(folder / "imagesTr" / f"{written['negative.nii']}_0000.nii.gz")).GetSpacing()
    assert spacing == (1.0, 2.0, 1.0) and "written with ITK's spacing (1.0, 2.0, 1.0)" in fixed.stdout
    assert set(reasons_by_name(folder)) == {"zero.mha", "zero.nrrd"}  # ITK cannot read these at all
    assert file_hashes(inputs) == before


def test_help_documents_the_spacing_flag(capsys):
    with pytest.raises(SystemExit):
        ingest_main(["-h"])
    assert "--fix_bad_spacing" in capsys.readouterr().out


def test_prepare_finetune_refuses_a_dataset_made_by_ingest(nnunet_dirs, tmp_path):
    write_image(tmp_path / "in" / "a.nii.gz", textured(SHAPE))
    run_ingest([tmp_path / "in"], dataset_id=503, dataset_name="Unlabeled")
    before = file_hashes(nnunet_dirs["nnUNet_raw"])

    result = run_command(["nnssl_prepare_finetune", "-d", 503, "-c", tmp_path / "pretrained.pth", "-np", 1,
                          "-npfp", 1], check=False)

    dataset_json = nnunet_dirs["nnUNet_raw"] / "Dataset503_Unlabeled" / "dataset.json"
    assert_one_line_error(result, "nnssl_prepare_finetune: error: ", f"{dataset_json} marks Dataset503_Unlabeled as "
                          "unlabeled", "Pass -d the ID of a labeled nnU-Net dataset")
    assert file_hashes(nnunet_dirs["nnUNet_raw"]) == before
    assert not os.listdir(nnunet_dirs["nnUNet_preprocessed"])


def test_unwritable_nnunet_raw_is_one_line_and_nothing_is_written(nnunet_dirs, tmp_path):
    write_image(tmp_path / "in" / "a.nii.gz", textured(SHAPE))
    raw = nnunet_dirs["nnUNet_raw"]

    with unwritable(raw):
        result = run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", 504, "-n", "Locked", "-np", 1],
                             check=False)

    assert_one_line_error(result, "nnssl_ingest: error: ", f"{raw} is not writable", "creates Dataset504_Locked there")
    assert not os.listdir(raw)


def test_unwritable_images_folder_of_an_existing_dataset_leaves_the_dataset_as_it_was(nnunet_dirs, tmp_path):
    for index in range(2):
        write_image(tmp_path / "first" / f"a{index}.nii.gz", textured(SHAPE, seed=index))
    run_ingest([tmp_path / "first"], dataset_id=505, dataset_name="Existing")
    for index in range(3):
        write_image(tmp_path / "more" / f"b{index}.nii.gz", textured(SHAPE, seed=10 + index))
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset505_Existing"
    before = file_hashes(folder)

    with unwritable(folder / "imagesTr"):
        result = run_command(["nnssl_ingest", "-i", tmp_path / "first", tmp_path / "more", "-d", 505, "-n",
                              "Existing", "-np", 1], check=False)

    assert_one_line_error(result, "nnssl_ingest: error: ", f"{folder / 'imagesTr'} is not writable")
    assert file_hashes(folder) == before  # no label of the new images either


def test_an_ingest_that_rejects_every_file_leaves_no_dataset_folder(nnunet_dirs, tmp_path):
    for name in ("a.nii.gz", "b.mha"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"not an image" * 100)

    result = run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", 506, "-n", "Nothing"], check=False)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Dataset506_Nothing was not created" in result.stdout
    assert f"rejected {tmp_path / 'in' / 'a.nii.gz'}: unreadable" in result.stdout
    assert not os.listdir(nnunet_dirs["nnUNet_raw"])  # no dataset folder blocks the ID, no staging folder


def start_ingest(inputs: Path, dataset_id: int) -> subprocess.Popen:
    """``nnssl_ingest`` with two workers in a session of its own, so that a signal reaches every process of it (as
    Ctrl-C in a terminal does)."""
    return subprocess.Popen([console_script("nnssl_ingest"), "-i", str(inputs), "-d", str(dataset_id), "-n", "Stop",
                             "-np", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_a_staged_case(raw: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not list(raw.glob(".nnssl_ingest_tmp_*/imagesTr/*_0000.nii.gz")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)


def many_images(folder: Path, count: int = 40) -> None:
    for index in range(count):
        write_image(folder / f"img{index:02d}.nii.gz", textured((48, 48, 48), np.float32, seed=index))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_stopped_ingest_leaves_a_consistent_dataset_or_none_and_the_rerun_completes(nnunet_dirs, tmp_path, stop):
    many_images(tmp_path / "in")
    before = file_hashes(tmp_path / "in")
    raw = nnunet_dirs["nnUNet_raw"]
    process = start_ingest(tmp_path / "in", 507)
    wait_for_a_staged_case(raw, process)

    os.killpg(process.pid, stop)
    result = subprocess.CompletedProcess(process.args, process.wait(COMMAND_TIMEOUT), *process.communicate())

    folder = raw / "Dataset507_Stop"
    if stop == signal.SIGINT:
        assert result.returncode == 130, result.stderr
        line = assert_one_line_error(result, "nnssl_ingest: interrupted (Ctrl-C). Dataset507_Stop ")
        assert "rerun the same command" in line
        assert not staging_leftovers(raw)
    kept = dataset_is_consistent(folder) if folder.exists() else 0
    if stop == signal.SIGINT:
        assert (f"keeps its {kept} complete cases" if kept else "was not created") in line

    rerun = run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", 507, "-n", "Stop", "-np", 2])

    assert f"{kept} unchanged and skipped" in rerun.stdout
    assert dataset_is_consistent(folder) == 40
    assert not staging_leftovers(raw)
    assert file_hashes(tmp_path / "in") == before


def test_a_symlinked_image_is_named_after_the_link(nnunet_dirs, tmp_path):
    target = write_image(tmp_path / "store" / "3f9a1c.nii.gz", textured(SHAPE))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "subject01.nii.gz").symlink_to(target)

    run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", 508, "-n", "Linked", "-np", 1])

    folder = nnunet_dirs["nnUNet_raw"] / "Dataset508_Linked"
    assert [name.split("_")[0] for name in os.listdir(folder / "imagesTr")] == ["subject01"]

    # a dataset whose case an older nnssl named after the target: the rerun renames it instead of adding a second
    new_case = next(iter(summary_of(folder)["accepted"]))
    old_case = case_identifier(os.path.realpath(target))
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (folder / sub / f"{new_case}{suffix}").rename(folder / sub / f"{old_case}{suffix}")
    summary = summary_of(folder)
    summary["accepted"] = {old_case: summary["accepted"][new_case]}
    (folder / SUMMARY_FILE).write_text(json.dumps(summary))

    run_command(["nnssl_ingest", "-i", tmp_path / "in", "-d", 508, "-n", "Linked", "-np", 1])

    assert os.listdir(folder / "imagesTr") == [f"{new_case}_0000.nii.gz"] and dataset_is_consistent(folder) == 1
