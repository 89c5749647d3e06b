"""VoCo, VolumeFusion and Models Genesis on the Primus, and VoCo's momentum teacher, through the stock commands
(tiny presets, CPU): each pair pretrains with nnUNetv2_train and on 2 gloo ranks, prepares a downstream dataset and
fine-tunes (``check_pretraining_pair``); the teacher is saved, resumed exactly and kept in step across ranks."""

import pytest
import torch

from conftest import SMOKE_PRETRAINING, TINY_DATASET, TINY_DATASET_ID, run_command
from method_pairs import check_pretraining_pair
from test_primus_e2e import fresh_tiny_primus
from test_torchrun import checksums, nnssl_train
from nnssl.architectures import network_from_plans
from nnssl.citations import apa_lines
from nnssl.methods.voco import VoCoModel
from nnssl.presets import PRIMUS_TINY


def primus_at(patch):
    arch = PRIMUS_TINY.architecture(patch)
    return network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, 1)


def cites(checkpoint: dict, *titles: str) -> bool:
    lines = apa_lines(checkpoint["citations"])
    return all(any(title in line for line in lines) for title in titles)


@pytest.mark.slow
def test_primus_voco_embeds_crops_with_a_primus_built_at_the_crop_size(tiny_pretraining_dataset, tmp_path):
    checkpoint = check_pretraining_pair(tiny_pretraining_dataset, "PrimusVoCoPretrainTrainer", "primus", tmp_path)
    at_crop = primus_at([32, 32, 32])
    weights = checkpoint["network_weights"]
    assert sorted({k.split(".")[0] for k in weights}) == ["down_projection", "eva"]  # projector discarded
    assert weights["eva.pos_embed"].shape == at_crop.eva.pos_embed.shape == (1, 64, 96)  # 4^3 tokens of a crop
    at_crop.load_state_dict({**at_crop.state_dict(), **weights}, strict=True)
    assert any(k.startswith("projector.") for k in checkpoint["nnssl_pretraining_weights"])
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    assert (plan["key_to_encoder"], plan["key_to_stem"]) == ("eva", "down_projection")
    assert cites(checkpoint, "Primus: Enforcing Attention", "VoCo")


@pytest.mark.slow
def test_primus_volume_fusion_and_models_genesis_export_the_whole_primus(tiny_pretraining_dataset, tmp_path):
    for trainer, outputs, title in (("PrimusVolumeFusionPretrainTrainer", 5, "MIS-FM"),
                                    ("PrimusModelsGenesisPretrainTrainer", 1, "Models Genesis")):
        checkpoint = check_pretraining_pair(tiny_pretraining_dataset, trainer, "primus", tmp_path / trainer)
        fresh = fresh_tiny_primus()
        weights = checkpoint["network_weights"]
        assert list(weights) == list(fresh.state_dict())
        head = [k for k in weights if k.startswith("up_projection.") and k.endswith("weight")][-1]
        assert outputs in weights[head].shape[:2], (head, weights[head].shape)
        assert cites(checkpoint, "Primus: Enforcing Attention", title)


@pytest.mark.slow
def test_voco_teacher_follows_the_student_and_is_resumed_exactly(tiny_pretraining_dataset, tmp_path):
    trainer = "VoCoPretrainTrainer_momentum"
    out = tiny_pretraining_dataset["nnUNet_results"] / TINY_DATASET / f"{trainer}__nnsslPlansTiny__3d_fullres" / \
        "fold_all"
    command = ["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p", "nnsslPlansTiny",
               "-device", "cpu"]
    two_epochs = {**SMOKE_PRETRAINING, "nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "2", "nnssl_seed": "0"}
    run_command(command, extra_env=two_epochs)
    straight = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    run_command(command, extra_env={**two_epochs, "nnssl_num_epochs": "1"})
    run_command(command + ["--c"], extra_env=two_epochs)
    resumed = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == straight["current_epoch"] == 2
    teacher = {k: v for k, v in straight["nnssl_pretraining_weights"].items() if k.startswith("teacher.")}
    assert teacher and all(torch.equal(v, resumed["nnssl_pretraining_weights"][k]) for k, v in teacher.items())
    student = straight["nnssl_pretraining_weights"]
    moved = [k for k in teacher if not torch.equal(teacher[k], student[k[len("teacher."):]])]
    assert moved  # an EMA of the student, not a copy of it
    assert not any(k.startswith("teacher.") for k in straight["network_weights"])

    env = {variable: str(folder) for variable, folder in tiny_pretraining_dataset.items()}
    env["nnUNet_results"] = str(tmp_path / "two_ranks")
    sums = checksums(nnssl_train(TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p", "nnsslPlansTiny",
                                 env={**env, **two_epochs}).stdout, 2)
    assert "teacher" in sums[0] and sums[0] == sums[1]


def test_teacher_update_is_an_exponential_moving_average():
    from conftest import tiny_network

    model = VoCoModel(tiny_network().encoder, teacher_momentum=0.9)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(1.0)
    model.update_teacher()
    name = "encoder.stem.convs.0.conv.weight"
    assert torch.allclose(model.teacher.state_dict()[name], before[name] + 0.1, atol=1e-6)
    model.train()
    assert model.encoder.training and not model.teacher.training  # no drop path / dropout in the teacher
    assert not any(p.requires_grad for p in model.teacher.parameters())
