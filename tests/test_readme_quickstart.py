"""The README's Quickstart, run verbatim: its bash blocks, in order, in a fresh folder, with the user's defaults
(nnU-Net's torch threads and forked augmentation workers, nothing from the test environment), under a time limit.

Then what each step promised is checked on what it wrote: 1 mm preprocessed data with the anatomy label carried
along, a pretraining checkpoint, the pretrained encoder loaded by the fine-tuning (stem and encoder, decoder skipped,
frozen first), the fair baseline trained on the same plans, and predictions of the held-out cases on their images'
grids, scored by nnU-Net's evaluation.
"""

import json
import os
import pickle
import re
import sys
import time
from pathlib import Path

import blosc2
import numpy as np
import SimpleITK as sitk

from conftest import run_command

README = Path(__file__).resolve().parents[1] / "README.md"
QUICKSTART_LIMIT = 900  # seconds: the README promises < 5 min on an idle 2-core machine; the suite runs beside it


def quickstart_blocks(readme: str) -> list:
    """The ```bash blocks of the README section whose heading starts with '## Quickstart', in order."""
    section = re.search(r"^## Quickstart.*?$(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert section, "README.md has no '## Quickstart' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert blocks, "the Quickstart section has no bash block"
    return blocks


def users_environment() -> dict:
    """This process's environment without what the suite or a developer may have set for nnU-Net or nnssl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "nnssl_", "NNSSL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the installed commands
    return env


def check_one_millimetre_b2nd(raw: Path, data_dir: Path) -> None:
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    assert sorted(p.stem for p in data_dir.glob("*.b2nd") if not p.stem.endswith("_seg")) == cases
    for case in cases:
        with open(data_dir / f"{case}.pkl", "rb") as f:
            properties = pickle.load(f)
        spacing_numpy_order = np.array(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz")).GetSpacing()[::-1])
        assert np.allclose(properties["spacing"], spacing_numpy_order)
        cropped = np.array(properties["shape_after_cropping_and_before_resampling"])
        data = blosc2.open(str(data_dir / f"{case}.b2nd"), mode="r")
        assert tuple(data.shape[1:]) == tuple(np.round(cropped * spacing_numpy_order).astype(int))  # 1 mm voxels
        seg = blosc2.open(str(data_dir / f"{case}_seg.b2nd"), mode="r")[:]
        assert set(np.unique(seg)) <= {-1, 0, 1} and (seg == 1).any()  # anatomy label carried along


def test_readme_quickstart_runs_verbatim(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(quickstart_blocks(README.read_text()))
    (tmp_path / "quickstart.sh").write_text(script)
    start = time.monotonic()
    result = run_command(["bash", tmp_path / "quickstart.sh"], cwd=tmp_path, env=users_environment(),
                         timeout=QUICKSTART_LIMIT)
    print(f"README quickstart: {time.monotonic() - start:.0f} s")

    demo = tmp_path / "demo"
    raw, results = demo / "nnUNet_raw", demo / "nnUNet_results"
    unlabeled, labeled = raw / "Dataset501_DemoUnlabeled", raw / "Dataset502_nnsslDemoLabeled"
    assert json.loads((unlabeled / "dataset.json").read_text())["nnssl"]["anatomy_masks"] is True
    check_one_millimetre_b2nd(unlabeled, demo / "nnUNet_preprocessed" / unlabeled.name / "nnsslPlansTiny_3d_fullres")
    pretrained = results / unlabeled.name / "S3DPretrainTrainer__nnsslPlansTiny__3d_fullres" / "fold_all"
    assert (pretrained / "checkpoint_final.pth").is_file() and (pretrained / "reconstruction_epoch_0000.png").is_file()

    finetuned = results / labeled.name / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres" / "fold_0"
    log = next(finetuned.glob("training_log_*.txt")).read_text()
    assert "loaded 4 tensors into the stem" in log and "tensors into the encoder" in log
    assert "skipped" in log and "Revisiting MAE" in log and "Encoder unfrozen" in log
    assert "augmentation workers are seeded" in log  # the seeded, ordered augmenter: the path that deadlocked
    baseline = results / labeled.name / "nnsslTrainer__nnsslFinetunePlans__3d_fullres" / "fold_0"
    assert (baseline / "checkpoint_final.pth").is_file() and (finetuned / "checkpoint_final.pth").is_file()

    predictions = demo / "predictions"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (labeled / "labelsTs").glob("*.nii.gz"))
    assert cases
    for case in cases:
        predicted = sitk.ReadImage(str(predictions / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(labeled / "labelsTs" / f"{case}.nii.gz"))
        assert predicted.GetSize() == label.GetSize() and predicted.GetSpacing() == label.GetSpacing()
        assert np.allclose(predicted.GetDirection(), label.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1}
    summary = json.loads((predictions / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(cases) and "1" in summary["mean"]
    print("held-out Dice after the smoke-length fine-tuning:", summary["mean"]["1"]["Dice"], result.stdout[-300:])
