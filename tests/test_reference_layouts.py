"""Checkpoints of the reference framework (MIC-DKFZ/nnssl) and its OpenMind releases: every (method, backbone)
layout maps onto the downstream network's stem and encoder, drops its pretraining-only parts with the reason, and
anything unknown is refused by name. Fixtures: tests/reference_checkpoints.py (tiny presets)."""

import json
import shutil

import pytest
import SimpleITK as sitk
import torch

from conftest import run_command, write_labeled_dataset
from reference_checkpoints import (CROP, DOWNSTREAM_PATCH, LAYOUTS, RESENC_KEYS, WRAPPED_EVA_KEYS, adaptation_plan,
                                   spark_checkpoint_as_saved)
from nnssl.errors import PretrainedWeightsError
from nnssl.finetuning.adaptation_plan import nnunet_architecture
from nnssl.finetuning.reference_layouts import resample_positional_embedding
from nnssl.finetuning.transfer import (check_weights_match_adaptation_plan, load_pretrained_checkpoint,
                                       transfer_pretrained_weights)

SMOKE_1 = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "1", "nnssl_val_iterations_per_epoch": "1",
           "nnssl_val_disable_tta": "1", "nnssl_seed": "0"}


def downstream_network(plan: dict, input_channels: int = 1):
    from nnssl.architectures import network_from_plans

    arch = nnunet_architecture(plan)
    return network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                              input_channels, 3)


def trained_tensor(weights: dict, key: str) -> torch.Tensor:
    """The tensor a checkpoint trained for ``key``: dna's ``.conv``/``.norm`` alias reads its ``all_modules`` twin."""
    for trained, alias in ((".all_modules.0.", ".conv."), (".all_modules.1.", ".norm.")):
        if alias in key and key.replace(alias, trained) in weights:
            return weights[key.replace(alias, trained)]
    return weights[key]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_reference_layout_loads_stem_and_encoder_and_reports_what_it_drops(name, tmp_path):
    layout = LAYOUTS[name]
    torch.save(layout.checkpoint(), tmp_path / "checkpoint_final.pth")
    checkpoint = load_pretrained_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    weights, plan = checkpoint["network_weights"], checkpoint["nnssl_adaptation_plan"]
    network = downstream_network(plan)
    report = transfer_pretrained_weights(network, weights, plan, source=name, patch_size=DOWNSTREAM_PATCH)

    source_prefix = {"stem": plan["key_to_stem"], "encoder": plan["key_to_encoder"]}
    target_prefix = {"stem": network.key_to_stem, "encoder": network.key_to_encoder}
    compared = 0
    for part in ("stem", "encoder"):
        for key, value in network.get_submodule(target_prefix[part]).state_dict().items():
            expected = trained_tensor(weights, f"{source_prefix[part]}.{key}")
            if key == "pos_embed" and expected.shape != value.shape:  # contrastive Primus: pretrained on crops
                expected = resample_positional_embedding(expected, [c // 8 for c in CROP],
                                                         [p // 8 for p in DOWNSTREAM_PATCH])
            assert torch.equal(value, expected), key
            compared += 1
    assert compared > 10 and report.loaded["stem"] >= 1 and report.loaded["encoder"] > 5
    assert set(report.skipped) == set(layout.dropped), report.skipped
    assert all(reason for _, reason in report.skipped.values())
    if source_prefix["encoder"] != target_prefix["encoder"]:
        assert "renamed encoder.eva.* -> eva.*" in report.lines()
    assert report.lines()[0].startswith("checkpoint layout: ")


def test_layouts_are_recognised_by_their_parts():
    names = {}
    for name, layout in LAYOUTS.items():
        checkpoint = layout.checkpoint()
        network = downstream_network(checkpoint["nnssl_adaptation_plan"])
        names[name] = transfer_pretrained_weights(network, checkpoint["network_weights"],
                                                  checkpoint["nnssl_adaptation_plan"],
                                                  patch_size=DOWNSTREAM_PATCH).layout
    assert names["voco_resenc"] == names["simclr_resenc"] == "ResEnc encoder with projector (VoCo, SimCLR)"
    assert names["voco_primus"] == "EVA encoder wrapped with projector (VoCo, SimCLR on Primus)"
    assert names["mae_primus"] == "EVA MAE with EVA decoder (MAE on Primus)"
    assert names["swinunetr_resenc"] == "ResEnc encoder with SwinUNETR heads"
    assert len({names["mae_resenc"], names["voco_resenc"], names["swinunetr_resenc"], names["mae_primus"],
                names["volume_fusion_primus"], names["voco_primus"], names["swinunetr_primus"]}) == 7


def test_unknown_tensors_are_refused_by_name_and_wrappers_are_stripped():
    layout = LAYOUTS["voco_primus"]
    checkpoint = layout.checkpoint()
    plan = checkpoint["nnssl_adaptation_plan"]
    weights = {"module." + key: value for key, value in checkpoint["network_weights"].items()}  # DDP-wrapped
    transfer_pretrained_weights(downstream_network(plan), weights, plan, patch_size=DOWNSTREAM_PATCH)

    weights["module.momentum_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(PretrainedWeightsError, match=r"1 checkpoint tensors .*\n  momentum_head.weight \(3, 3\)"):
        transfer_pretrained_weights(downstream_network(plan), weights, plan, patch_size=DOWNSTREAM_PATCH)

    # a plan naming the wrong prefixes leaves the wrapped encoder unexplained: refused, its keys named
    wrong = {**plan, "key_to_encoder": "eva", "key_to_stem": "down_projection"}
    with pytest.raises(PretrainedWeightsError, match=r"encoder\.down_projection\.proj\.weight"):
        transfer_pretrained_weights(downstream_network(plan), checkpoint["network_weights"], wrong,
                                    patch_size=DOWNSTREAM_PATCH)


def test_a_teacher_copy_is_dropped_and_the_student_encoder_loads():
    checkpoint = LAYOUTS["voco_resenc"].checkpoint()
    weights = checkpoint["network_weights"]
    teacher = {"teacher." + key: torch.zeros_like(value) for key, value in weights.items()
               if key.startswith("encoder.")}
    network = downstream_network(checkpoint["nnssl_adaptation_plan"])
    report = transfer_pretrained_weights(network, {**weights, **teacher}, checkpoint["nnssl_adaptation_plan"])
    assert report.skipped["teacher.*"][0] == len(teacher)
    assert torch.equal(network.state_dict()["encoder.stem.convs.0.all_modules.0.weight"],
                       weights["encoder.stem.convs.0.all_modules.0.weight"])


def test_positional_embedding_resampling_keeps_orientation_and_identity():
    ramp = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 4, 1)  # grows along the first spatial axis only
    resampled = resample_positional_embedding(ramp.reshape(1, 64, 1), (4, 4, 4), (8, 8, 8)).view(8, 8, 8)
    assert torch.all(resampled[1:] >= resampled[:-1]) and torch.equal(resampled[:, 0, 0], resampled[:, 7, 7])
    assert resampled[7, 0, 0] > resampled[0, 0, 0] and torch.equal(resampled[0], resampled[0, 0, 0].expand(8, 8))
    same = torch.randn(1, 64, 5)
    assert torch.allclose(resample_positional_embedding(same, (4, 4, 4), (4, 4, 4)), same)


def test_a_pretrain_patch_size_entry_overrides_the_configuration_patch():
    """Plans that record the whole VoCo patch (256x256x64) name the crop in ``pretrain_patch_size`` instead."""
    checkpoint = LAYOUTS["voco_primus"].checkpoint()
    plan = checkpoint["nnssl_adaptation_plan"]
    plan["pretrain_plan"]["configurations"]["onemmiso"]["patch_size"] = [128, 128, 32]
    with pytest.raises(PretrainedWeightsError, match=r"does not fit the pretraining patch \[128, 128, 32\]"):
        transfer_pretrained_weights(downstream_network(plan), checkpoint["network_weights"], plan,
                                    patch_size=DOWNSTREAM_PATCH)
    plan["pretrain_patch_size"] = CROP
    report = transfer_pretrained_weights(downstream_network(plan), checkpoint["network_weights"], plan,
                                         patch_size=DOWNSTREAM_PATCH)
    assert any(line.startswith("eva.pos_embed: resampled (1, 64, 96)") for line in report.adapted)


def test_full_size_openmind_plans_by_preset_name_map_on_the_meta_device():
    """The released form: "ResEncL" and "PrimusM" by name, contrastive crops of 64^3 and 160^3 downstream (the
    Primus-M positional embedding is resampled from 8^3 to 20^3 tokens)."""
    from nnssl.architectures import network_from_plans

    for name, keys, encoder_key in (("ResEncL", RESENC_KEYS, "encoder.stages.5.blocks.5.conv2.conv.weight"),
                                    ("PrimusM", WRAPPED_EVA_KEYS, "encoder.eva.blocks.15.attn.proj.weight")):
        plan = adaptation_plan({"arch_class_name": name, "arch_kwargs": None, "arch_kwargs_requiring_import": None},
                               keys, [64, 64, 64])
        plan["recommended_downstream_patchsize"] = [160, 160, 160]
        arch = nnunet_architecture(plan)
        with torch.device("meta"):
            downstream = network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                            arch["_kw_requires_import"], 1, 2)
            if name == "PrimusM":
                arch64 = nnunet_architecture({**plan, "recommended_downstream_patchsize": [64, 64, 64]})
                pretrained = network_from_plans(arch64["network_class_name"], arch64["arch_kwargs"], [], 1, 2)
                weights = {"encoder." + k: v for k, v in pretrained.state_dict().items()
                           if not k.startswith("up_projection.")}
                weights["projector.layer1.0.weight"] = torch.empty(2048, 864)
            else:
                weights = {"encoder." + k: v for k, v in downstream.encoder.state_dict().items()}
                widths = sum(arch["arch_kwargs"]["features_per_stage"])
                weights["projector.layer1.0.weight"] = torch.empty(2048, widths)
            report = transfer_pretrained_weights(downstream, weights, plan,
                                                 patch_size=arch["arch_kwargs"].get("input_shape"))
        assert encoder_key in weights and "projector.*" in report.skipped
        if name == "PrimusM":
            assert weights["encoder.eva.pos_embed"].shape == (1, 512, 864)
            assert any("eva.pos_embed: resampled (1, 512, 864) -> (1, 8000, 864)" in line for line in report.adapted)


def test_prepare_finetune_names_the_fix_for_a_spark_checkpoint_without_plan(nnunet_dirs, tmp_path):
    from nnssl.plans.prepare_finetune import prepare_finetune

    write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 81, "RefSpark", shapes=[(20, 20, 20)], spacings=[(1, 1, 1)])
    torch.save(spark_checkpoint_as_saved(), tmp_path / "spark.pth")
    with pytest.raises(PretrainedWeightsError, match="Spark trainers save none: add it with the reference's"):
        prepare_finetune(81, str(tmp_path / "spark.pth"), preprocess=False)


def test_check_at_planning_time_uses_the_layout_mapping():
    for name in ("voco_primus", "swinunetr_resenc"):
        report = check_weights_match_adaptation_plan(LAYOUTS[name].checkpoint(), name)
        assert report.loaded["encoder"] > 5


@pytest.mark.parametrize("name, dataset_id, patch", [("voco_resenc", 82, [32, 48, 64]),
                                                     ("voco_primus", 83, [48, 32, 40])])
@pytest.mark.slow
def test_reference_checkpoint_through_prepare_finetune_and_nnunetv2_train(name, dataset_id, patch, nnunet_dirs,
                                                                          tmp_path):
    """A contrastive ResEnc and a contrastive Primus checkpoint (renamed encoder, resampled positional embedding)
    through the user's commands at a downstream patch of the user's (-ps): nnssl_prepare_finetune, one epoch of
    nnsslFinetuneTrainer, and for the Primus (built for the new patch) nnUNetv2_predict."""
    checkpoint = tmp_path / f"{name}.pth"
    torch.save(LAYOUTS[name].checkpoint(), checkpoint)
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], dataset_id, "RefDown", shapes=[(36, 40, 38)] * 2,
                                   spacings=[(1.0, 1.0, 1.0)] * 2)
    run_command(["nnssl_prepare_finetune", "-d", dataset_id, "-c", checkpoint, "-ps", *patch, "-np", 1, "-npfp", 1])
    dataset = f"Dataset{dataset_id:03d}_RefDown"
    plans = json.loads((nnunet_dirs["nnUNet_preprocessed"] / dataset / "nnsslFinetunePlans.json").read_text())
    assert plans["nnssl_pretrained"]["trainer_name"] == LAYOUTS[name].trainer_name
    assert plans["configurations"]["3d_fullres"]["patch_size"] == patch
    run_command(["nnUNetv2_train", dataset_id, "3d_fullres", "all", "-tr", "nnsslFinetuneTrainer", "-p",
                 "nnsslFinetunePlans", "-device", "cpu"], extra_env=SMOKE_1)
    folder_out = nnunet_dirs["nnUNet_results"] / dataset / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres"
    log = "".join(p.read_text() for p in (folder_out / "fold_all").glob("training_log_*.txt"))
    network = downstream_network(LAYOUTS[name].plan())
    encoder_tensors = len({v.data_ptr() for v in network.get_submodule(network.key_to_encoder).state_dict().values()})
    assert f"loaded {encoder_tensors} tensors into the encoder" in log, log[-3000:]
    assert "skipped 6 checkpoint tensors: projector.* (contrastive projection head" in log
    assert "Training done." in log
    if name == "voco_resenc":
        return
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["input_shape"] == patch
    assert "renamed encoder.eva.* -> eva.*" in log
    assert ("eva.pos_embed: resampled (1, 64, 96) -> (1, 120, 96) (pretraining patch [32, 32, 32] -> downstream "
            "patch [48, 32, 40], token grid [4, 4, 4] -> [6, 4, 5], trilinear)") in log
    images = tmp_path / "predict_in"
    images.mkdir()
    shutil.copy(folder / "imagesTr" / "case001_0000.nii.gz", images)
    run_command(["nnUNetv2_predict", "-i", images, "-o", tmp_path / "predict_out", "-d", dataset_id, "-c",
                 "3d_fullres", "-f", "all", "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans", "-chk",
                 "checkpoint_final.pth", "-device", "cpu", "--disable_tta", "-npp", 0, "-nps", 0])
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "predict_out" / "case001.nii.gz")))
    assert segmentation.shape == (36, 40, 38) and set(segmentation.ravel().tolist()) <= {0, 1}
