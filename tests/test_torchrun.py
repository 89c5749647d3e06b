"""``nnssl_train`` under ``torchrun --nproc_per_node 2`` on CPU (gloo), tiny preset: DDP semantics, resume, fine-tuning.

What DDP must guarantee, checked from outside the processes where possible: the plans' batch split exactly over the
ranks, different cases per rank, the same mask ratio with different block patterns, identical weights on every rank
(each rank prints a weights checksum line), one writer (rank 0) for checkpoints, logs and figures, gathered validation
losses, ``--c`` resuming every rank (with its own mask stream), and a frozen encoder that stays bit-identical.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import TINY_DATASET, TINY_DATASET_ID, console_script, run_command, write_labeled_dataset

SMOKE = {"nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}
S3D = "S3DPretrainTrainer"
CHECKSUM_LINE = re.compile(r"nnssl_train rank (\d)/2: epoch (\d+), weights sha256 ((?:\w+=[0-9a-f]{16} ?)+)")
START_LINE = re.compile(r"nnssl_train rank (\d)/2 \(local rank \d, cpu, gloo\): batch (\d+) of (\d+), starting at "
                        r"epoch (\d+)")
FINETUNE_ID, FINETUNE_DATASET = 36, "Dataset036_DdpDown"


def torchrun(args: List, env: Dict[str, str]):
    """``torchrun --standalone --nproc_per_node 2`` (a free rendezvous port, so parallel runs never collide)."""
    return run_command(["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", *args], extra_env=env,
                       timeout=300)


def nnssl_train(*args, env: Dict[str, str]):
    return torchrun([console_script("nnssl_train"), *args, "-device", "cpu"], env)


def rank_lines(stdout: str, pattern: re.Pattern) -> Dict[int, tuple]:
    lines = {int(m.group(1)): m.groups()[1:] for m in pattern.finditer(stdout)}
    assert sorted(lines) == [0, 1], stdout[-3000:]
    return lines


def checksums(stdout: str, epoch: int) -> Dict[int, Dict[str, str]]:
    """Each rank's checksum line, parsed into {part: checksum}, after asserting both ranks ended at ``epoch``."""
    lines = rank_lines(stdout, CHECKSUM_LINE)
    assert {int(e) for e, _ in lines.values()} == {epoch}
    return {rank: dict(item.split("=") for item in sums.split()) for rank, (_, sums) in lines.items()}


def assert_mask_streams_per_rank(checkpoint: dict) -> None:
    """Both ranks' mask streams are in the checkpoint: the same ratio stream, different pattern streams."""
    rank0, rank1 = checkpoint["nnssl_trainer_state"]["mask_sampler_per_rank"]
    assert rank0["ratio_rng"] == rank1["ratio_rng"]
    assert not torch.equal(rank0["pattern_rng"]["state"], rank1["pattern_rng"]["state"])


@pytest.fixture(scope="module")
def two_rank_s3d(_shared_tiny_dataset, tmp_path_factory):
    """One 2-rank S3D pretraining (2 epochs) on the shared tiny dataset, in its own results folder."""
    env = {variable: str(folder) for variable, folder in _shared_tiny_dataset.items()}
    env["nnUNet_results"] = str(tmp_path_factory.mktemp("ddp_results"))
    result = nnssl_train(TINY_DATASET_ID, "3d_fullres", "all", "-tr", S3D, "-p", "nnsslPlansTiny", env={**env, **SMOKE})
    out = Path(env["nnUNet_results"]) / TINY_DATASET / f"{S3D}__nnsslPlansTiny__3d_fullres" / "fold_all"
    pretrained = out.parent / "pretrained_after_2_epochs.pth"
    shutil.copyfile(out / "checkpoint_final.pth", pretrained)  # the resume test moves checkpoint_final on
    return {"env": env, "out": out, "stdout": result.stdout, "pretrained": pretrained}


# ------------------------------------------------------------------------------------------------- without torchrun
def test_torchrun_environment_is_read_and_checked():
    from nnssl.integration.distributed import DistributedSetupError, TorchrunEnvironment, torchrun_environment

    assert torchrun_environment({"PATH": "/bin"}) is None
    full = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500"}
    assert torchrun_environment(full) == TorchrunEnvironment(rank=3, local_rank=1, world_size=4, local_world_size=2)
    with pytest.raises(DistributedSetupError, match="RANK set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT "
                                                    "missing"):
        torchrun_environment({"RANK": "0"})
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE='two' is not an integer"):
        torchrun_environment({**full, "WORLD_SIZE": "two"})
    with pytest.raises(DistributedSetupError, match="RANK=4, LOCAL_RANK=1, WORLD_SIZE=4"):
        torchrun_environment({**full, "RANK": "4"})


def test_batch_is_split_exactly_over_the_ranks():
    from nnssl.integration.distributed import DistributedSetupError, per_rank_batch_size

    assert per_rank_batch_size(6, 3) == 2 and per_rank_batch_size(2, 2) == 1 and per_rank_batch_size(6, 1) == 6
    for batch, world in ((3, 2), (1, 2)):
        with pytest.raises(DistributedSetupError, match=f"batch size {batch} is not divisible by the world size "
                                                        f"{world}"):
            per_rank_batch_size(batch, world)


def test_weight_checksums_are_exact_and_per_part():
    from nnssl.integration.weights_checksum import state_dict_checksums

    state = {"encoder.w": torch.ones(3), "decoder.w": torch.zeros(2, dtype=torch.bfloat16)}
    sums = state_dict_checksums(state)
    assert set(sums) == {"all", "encoder", "decoder"} and sums == state_dict_checksums(dict(reversed(state.items())))
    nudged = state_dict_checksums({**state, "encoder.w": torch.nextafter(torch.ones(3), torch.tensor(2.0))})
    assert nudged["encoder"] != sums["encoder"] and nudged["all"] != sums["all"]
    assert nudged["decoder"] == sums["decoder"]
    assert state_dict_checksums({"encoder.w": torch.ones(1, 3)})["all"] != state_dict_checksums(
        {"encoder.w": torch.ones(3)})["all"]


def test_plain_launch_is_nnunetv2_train(monkeypatch):
    import nnssl.integration.train
    import nnssl.integration.train_cli

    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    calls = []
    monkeypatch.setattr(nnssl.integration.train, "run_training", lambda *args, **kwargs: calls.append((args, kwargs)))
    threads = torch.get_num_threads()
    try:
        nnssl.integration.train_cli.main(["31", "3d_fullres", "all", "-tr", S3D, "-p", "nnsslPlansTiny", "--c", "-device",
                                          "cpu"])
    finally:
        torch.set_num_threads(threads)
    # nnU-Net's run_training_entry passes the same arguments, in this order
    assert calls == [(("31", "3d_fullres", "all", S3D, "nnsslPlansTiny", None, 1, False, True, False, False, False),
                      {"device": torch.device("cpu")})]


def test_num_gpus_is_refused_under_torchrun(monkeypatch):
    import nnssl.integration.train_cli

    for variable, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
                            "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match="-num_gpus is nnU-Net's single-node launcher"):
        nnssl.integration.train_cli.main(["31", "3d_fullres", "all", "-num_gpus", "2", "-device", "cpu"])


# ------------------------------------------------------------------------------------------------- under torchrun
PROBE = """
import json
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnssl.integration.checkpoint import unwrap
from nnssl.integration.distributed import (DistributedSetupError, gather_from_all_ranks, torchrun_environment,
                                           torchrun_session)
from nnssl.integration.train import build_trainer

env = torchrun_environment()


def probe(device):
    # a function, so that the trainers are released inside the session (see torchrun_session)
    try:
        build_trainer("{dataset}", "3d_fullres", "all", "{trainer}", "nnsslPlansTinyBatch3", False, env, device)
        indivisible = None
    except DistributedSetupError as error:
        indivisible = str(error)
    trainer, _ = build_trainer("{dataset}", "3d_fullres", "all", "{trainer}", "nnsslPlansTiny", False, env, device)
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    masks = [trainer.mask_sampler.sample(trainer.batch_size) for _ in range(4)]
    # what -pretrained_weights does (nnU-Net's loader, which maps to cuda:<rank> under DDP unless redirected)
    network = unwrap(trainer.network).network
    torch.save({{"network_weights": network.state_dict()}}, "{folder}/weights_rank%d.pth" % env.rank)
    load_pretrained_weights(network, "{folder}/weights_rank%d.pth" % env.rank)
    report = {{"indivisible": indivisible, "batch_size": trainer.batch_size,
               "cases": [list(next(loader)["keys"]) for _ in range(16)],
               "masked_cells": [int((m == 0).sum()) for m in masks], "patterns": [m.flatten().tolist() for m in masks],
               "mean_of_rank_losses": trainer._epoch_mean([{{"loss": float(env.rank + 1)}}])}}
    ranks = gather_from_all_ranks(report)
    if env.rank == 0:
        print("PROBE " + json.dumps(ranks))


with torchrun_session(env, "cpu") as device:
    probe(device)
"""


def test_ddp_batch_split_sampling_masks_loss_gathering_and_pretrained_weights(tiny_pretraining_dataset, tmp_path):
    """Inside the real 2-rank set-up of nnssl_train (build_trainer, torchrun_session) on the CPU."""
    preprocessed = tiny_pretraining_dataset["nnUNet_preprocessed"] / TINY_DATASET
    plans = json.loads((preprocessed / "nnsslPlansTiny.json").read_text())
    plans["plans_name"] = "nnsslPlansTinyBatch3"
    plans["configurations"]["3d_fullres"]["batch_size"] = 3
    (preprocessed / "nnsslPlansTinyBatch3.json").write_text(json.dumps(plans))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(dataset=TINY_DATASET_ID, trainer=S3D, folder=tmp_path))
    result = torchrun([console_script("python"), probe], {"nnUNet_results": str(tmp_path / "results")})
    rank0, rank1 = json.loads(result.stdout.split("PROBE ", 1)[1].splitlines()[0])

    assert rank0["indivisible"] == rank1["indivisible"] and "batch size 3 is not divisible by the world size 2" in \
        rank0["indivisible"]
    assert rank0["batch_size"] == rank1["batch_size"] == 1  # plans batch 2 over 2 ranks
    assert rank0["cases"] != rank1["cases"]  # 16 independent draws from 2 cases: equal by chance with p = 2^-16
    assert rank0["masked_cells"] == rank1["masked_cells"]  # the same ratio on every rank ...
    assert all(a != b for a, b in zip(rank0["patterns"], rank1["patterns"]))  # ... with different block patterns
    assert rank0["mean_of_rank_losses"] == rank1["mean_of_rank_losses"] == 1.5  # losses 1 and 2, gathered


@pytest.mark.slow
def test_s3d_pretraining_two_ranks_stay_identical_and_resume(two_rank_s3d):
    out, env = two_rank_s3d["out"], two_rank_s3d["env"]
    starts = rank_lines(two_rank_s3d["stdout"], START_LINE)
    assert set(starts.values()) == {("1", "2", "0")}
    sums = checksums(two_rank_s3d["stdout"], epoch=2)
    assert sums[0] == sums[1]  # gradients averaged: every parameter (network, mask tokens, densification) equal

    # one writer: one log with each epoch once, the figures, no stray temporary checkpoint files
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and logs[0].read_text().count(" train_loss ") == 2
    assert {p.name for p in out.iterdir()} == {"checkpoint_best.pth", "checkpoint_final.pth", "debug.json",
                                               logs[0].name, "progress.png", "reconstruction_epoch_0000.png",
                                               "reconstruction_epoch_0001.png"}
    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2 and len(checkpoint["logging"]["val_losses"]) == 2
    assert_mask_streams_per_rank(checkpoint)  # also after the reconstruction figures, which every rank draws

    # --c: both ranks resume at epoch 2 from the same checkpoint, each with its own pattern stream
    result = nnssl_train(TINY_DATASET_ID, "3d_fullres", "all", "-tr", S3D, "-p", "nnsslPlansTiny", "--c",
                         env={**env, **SMOKE, "nnssl_num_epochs": "3"})
    assert set(rank_lines(result.stdout, START_LINE).values()) == {("1", "2", "2")}
    resumed_sums = checksums(result.stdout, epoch=3)
    assert resumed_sums[0] == resumed_sums[1] != sums[0]
    resumed = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 3 and len(resumed["logging"]["train_losses"]) == 3
    assert_mask_streams_per_rank(resumed)


@pytest.mark.slow
def test_frozen_encoder_finetuning_on_two_ranks(two_rank_s3d):
    from nnssl.integration.weights_checksum import state_dict_checksums

    env = two_rank_s3d["env"]
    write_labeled_dataset(Path(env["nnUNet_raw"]), FINETUNE_ID, "DdpDown", shapes=[(36, 40, 38)] * 5,
                          spacings=[(1.0, 1.0, 1.0)] * 5)
    run_command(["nnssl_prepare_finetune", "-d", FINETUNE_ID, "-c", two_rank_s3d["pretrained"], "-np", 1, "-npfp", 1],
                extra_env=env)
    trainer = "nnsslFinetuneTrainer_frozen"
    result = nnssl_train(FINETUNE_ID, "3d_fullres", 0, "-tr", trainer, "-p", "nnsslFinetunePlans",
                         env={**env, **SMOKE, "nnssl_val_disable_tta": "1"})

    sums = checksums(result.stdout, epoch=2)
    pretrained = torch.load(two_rank_s3d["pretrained"], map_location="cpu", weights_only=False)["network_weights"]
    pretrained_encoder = state_dict_checksums({k: v for k, v in pretrained.items() if k.startswith("encoder.")})
    assert sums[0] == sums[1]  # the trained decoder is identical on both ranks too
    assert sums[0]["encoder"] == pretrained_encoder["encoder"]  # bit-identical to the pretrained encoder
    out = Path(env["nnUNet_results"]) / FINETUNE_DATASET / f"{trainer}__nnsslFinetunePlans__3d_fullres" / "fold_0"
    assert (out / "checkpoint_final.pth").is_file() and (out / "validation" / "summary.json").is_file()
