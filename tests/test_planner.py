"""nnsslPlanner / nnsslPlannerTiny through the stock nnUNetv2_plan_and_preprocess command."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import run_command, write_labeled_dataset

RESENC_L_ARCH_KWARGS = {
    "n_stages": 6,
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def plan(dataset_id: int, planner: str, *extra: str) -> None:
    run_command(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-pl", planner, "-np", 1, "-npfp", 1,
                 "--no_pbar", *extra])


def load_plans(nnunet_dirs, folder: Path, plans_name: str) -> dict:
    return json.loads((nnunet_dirs["nnUNet_preprocessed"] / folder.name / f"{plans_name}.json").read_text())


@pytest.mark.slow
def test_full_preset_is_exactly_resenc_l_whatever_the_dataset(nnunet_dirs):
    raw = nnunet_dirs["nnUNet_raw"]
    small = write_labeled_dataset(raw, 11, "Small", shapes=[(20, 24, 18), (22, 20, 20)],
                                  spacings=[(3.0, 1.0, 1.0), (2.5, 0.9, 0.9)])
    large = write_labeled_dataset(raw, 12, "Large", shapes=[(40, 50, 45), (44, 52, 40)],
                                  spacings=[(1.2, 1.4, 1.3), (1.0, 1.5, 1.5)], num_channels=2)
    architectures = []
    for folder, dataset_id, batch_size in ((small, 11, "6"), (large, 12, "3")):
        run_command(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-pl", "nnsslPlanner", "-npfp", 1, "--no_pp"],
                    extra_env={"nnssl_batch_size": batch_size})  # 6 is also the default
        plans = load_plans(nnunet_dirs, folder, "nnsslPlans")
        assert list(plans["configurations"]) == ["3d_fullres"]
        config = plans["configurations"]["3d_fullres"]
        assert config["spacing"] == [1.0, 1.0, 1.0]
        assert config["patch_size"] == [160, 160, 160]
        assert config["batch_size"] == int(batch_size)
        assert config["data_identifier"] == "nnsslPlans_3d_fullres"
        assert set(config["normalization_schemes"]) == {"ZScoreNormalization"}
        assert plans["transpose_forward"] == [0, 1, 2]
        arch = config["architecture"]
        assert arch["network_class_name"] == \
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        assert arch["arch_kwargs"] == RESENC_L_ARCH_KWARGS
        architectures.append(arch)
    assert architectures[0] == architectures[1]
    result = run_command(["nnUNetv2_plan_experiment", "-d", 11, "-pl", "nnsslPlanner"],
                         extra_env={"nnssl_batch_size": "six"}, check=False)
    assert result.returncode != 0
    assert "nnssl_batch_size='six'" in result.stderr


def test_full_preset_builds_the_102m_parameter_resenc_l(nnunet_dirs):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnssl.presets import RESENC_L

    arch = RESENC_L.architecture()
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, 1, deep_supervision=False)
    n_params = sum(p.numel() for p in network.parameters())
    encoder_params = sum(p.numel() for p in network.encoder.parameters())
    assert 102.0e6 < n_params < 102.7e6
    assert 90.0e6 < encoder_params < 90.6e6
    assert len(network.decoder.stages) == 5 and all(len(s.convs) == 1 for s in network.decoder.stages)


def test_tiny_preset_preprocesses_to_one_millimetre_b2nd(nnunet_dirs):
    raw = nnunet_dirs["nnUNet_raw"]
    folder = write_labeled_dataset(raw, 14, "Tiny", shapes=[(16, 30, 26), (20, 24, 24)],
                                   spacings=[(2.0, 0.8, 1.0), (1.5, 1.25, 1.0)])
    plan(14, "nnsslPlannerTiny")
    plans = load_plans(nnunet_dirs, folder, "nnsslPlansTiny")
    config = plans["configurations"]["3d_fullres"]
    assert config["data_identifier"] == "nnsslPlansTiny_3d_fullres"
    assert config["architecture"]["arch_kwargs"]["n_stages"] == 5
    assert config["patch_size"] == [64, 64, 64]
    data_dir = nnunet_dirs["nnUNet_preprocessed"] / folder.name / "nnsslPlansTiny_3d_fullres"
    b2nd = sorted(p.name for p in data_dir.glob("*.b2nd"))
    assert b2nd == ["case000.b2nd", "case000_seg.b2nd", "case001.b2nd", "case001_seg.b2nd"]
    import blosc2

    for case, spacing in (("case000", (2.0, 0.8, 1.0)), ("case001", (1.5, 1.25, 1.0))):
        with open(data_dir / f"{case}.pkl", "rb") as f:
            properties = pickle.load(f)
        data = blosc2.open(str(data_dir / f"{case}.b2nd"), mode="r")
        before = np.array(properties["shape_after_cropping_and_before_resampling"])
        expected_at_1mm = np.round(before * np.array(spacing)).astype(int)
        assert tuple(data.shape[1:]) == tuple(expected_at_1mm)
        values = data[:]
        assert abs(float(values.mean())) < 0.2 and abs(float(values.std()) - 1) < 0.2  # z-scored


def test_header_only_fingerprint_matches_nnunet_geometry(nnunet_dirs):
    raw = nnunet_dirs["nnUNet_raw"]
    folder = write_labeled_dataset(raw, 15, "Fp", shapes=[(20, 24, 18), (22, 20, 26), (18, 18, 18)],
                                   spacings=[(3.0, 1.0, 0.5), (2.5, 0.9, 0.9), (1.0, 1.0, 1.0)])
    fingerprint_file = nnunet_dirs["nnUNet_preprocessed"] / folder.name / "dataset_fingerprint.json"
    run_command(["nnUNetv2_extract_fingerprint", "-d", 15, "-np", 1, "--clean"])
    stock = json.loads(fingerprint_file.read_text())
    plan(15, "nnsslPlannerTiny", "-fpe", "nnsslFingerprintExtractor", "--clean", "--no_pp")
    ours = json.loads(fingerprint_file.read_text())
    assert ours["spacings"] == stock["spacings"]
    assert ours["shapes_after_crop"] == [[20, 24, 18], [22, 20, 26], [18, 18, 18]]
    assert "header-only" in ours["nnssl_fingerprint"]
    for key in ("mean", "std", "percentile_99_5"):
        assert ours["foreground_intensity_properties_per_channel"]["0"][key] == pytest.approx(
            stock["foreground_intensity_properties_per_channel"]["0"][key], rel=0.05)
    assert load_plans(nnunet_dirs, folder, "nnsslPlansTiny")["configurations"]["3d_fullres"]["spacing"] == [1.0] * 3


@pytest.mark.parametrize("name, dataset_id, spacing, patch, n_stages",
                         [("Mini", 16, 1.5, 48, 5)])
def test_probe_presets_plan_the_tiny_network_family_at_coarser_spacings(nnunet_dirs, name, dataset_id, spacing,
                                                                         patch, n_stages):
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], dataset_id, name, shapes=[(20, 24, 22), (22, 20, 24)],
                                   spacings=[(1.0, 1.0, 1.0), (1.2, 0.9, 1.1)])
    plan(dataset_id, f"nnsslPlanner{name}", "--no_pp")
    config = load_plans(nnunet_dirs, folder, f"nnsslPlans{name}")["configurations"]["3d_fullres"]
    assert config["spacing"] == [spacing] * 3 and config["patch_size"] == [patch] * 3
    assert config["data_identifier"] == f"nnsslPlans{name}_3d_fullres"
    from nnssl.presets import RESENC_TINY

    kwargs = config["architecture"]["arch_kwargs"]
    tiny = RESENC_TINY.architecture()["arch_kwargs"]
    assert kwargs["features_per_stage"] == tiny["features_per_stage"][:n_stages]  # the tiny network's widths
    assert kwargs["n_blocks_per_stage"] == tiny["n_blocks_per_stage"][:n_stages]
    assert kwargs["n_stages"] == n_stages
    same = [k for k, v in tiny.items() if not isinstance(v, list) and k != "n_stages"]  # convs, norms, nonlin
    assert {k: kwargs[k] for k in same} == {k: tiny[k] for k in same}
