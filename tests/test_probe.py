"""The frozen-encoder probe through its entry points (tiny presets, CPU): ``nnssl_probe`` on a U-Net and a Primus
checkpoint, and the periodic probe inside a pretraining run, which must leave the run exactly as it was."""

import json
import re

import pytest
import torch

from conftest import SMOKE_PRETRAINING, TINY_DATASET, TINY_DATASET_ID, run_command

S3D = "S3DPretrainTrainer"
PROBE_ITERATIONS = 2
PERIODIC_PROBE = {"nnssl_probe_dataset": str(TINY_DATASET_ID), "nnssl_probe_every": "1",
                  "nnssl_probe_iterations": str(PROBE_ITERATIONS)}
DICE_LINES = re.compile(r"pretrained encoder Dice: (\d\.\d{4})\nrandom encoder Dice: +(\d\.\d{4})\n"
                        r"difference pretrained - random: [+-]\d\.\d{4}\n"
                        r"ratio pretrained/random (\d+\.\d{4}|n/a \(the random encoder's Dice is 0\))\n")


def pretrain(dirs, results, extra_env=None):
    """Two seeded S3D epochs of one iteration on the shared tiny dataset, into their own results folder."""
    env = {**SMOKE_PRETRAINING, "nnssl_num_epochs": "2", "nnssl_seed": "0", "nnUNet_raw": str(dirs["nnUNet_raw"]),
           "nnUNet_preprocessed": str(dirs["nnUNet_preprocessed"]), "nnUNet_results": str(results),
           **(extra_env or {})}
    run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", S3D, "-p", "nnsslPlansTiny", "-device",
                 "cpu"], extra_env=env)
    out = results / TINY_DATASET / f"{S3D}__nnsslPlansTiny__3d_fullres" / "fold_all"
    log = "".join(p.read_text() for p in sorted(out.glob("training_log_*.txt")))
    return out, torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False), log


def probe_command(checkpoint, plans, output, *extra):
    result = run_command(["nnssl_probe", "-d", TINY_DATASET_ID, "-c", checkpoint, "-p", plans, "-device", "cpu", "-i",
                          PROBE_ITERATIONS, "-o", output, *extra])
    match = DICE_LINES.search(result.stdout)
    assert match, result.stdout[-3000:]
    record = json.loads(output.read_text())
    assert (record["pretrained"]["dice"], record["random"]["dice"]) == \
        pytest.approx((float(match.group(1)), float(match.group(2))), abs=1e-4)
    return result.stdout, record


@pytest.fixture(scope="module")
def probed_run(_shared_tiny_dataset, tmp_path_factory):
    """A pretraining run with the periodic probe at both epochs; the probe plans its dataset on the fly."""
    return pretrain(_shared_tiny_dataset, tmp_path_factory.mktemp("probe_on"), PERIODIC_PROBE)


def test_periodic_probe_is_logged_checkpointed_drawn_and_repeated_by_nnssl_probe(probed_run, tiny_pretraining_dataset,
                                                                                  tmp_path):
    out, checkpoint, log = probed_run
    assert "nnsslProbe_nnsslPlansTiny of dataset 31 not prepared yet: planning and preprocessing it" in log
    assert len(re.findall(r"probe Dice \d\.\d{4} \(random encoder \d\.\d{4}, ratio \S+\) on Dataset031_Pre; the "
                          r"probe took [\d.]+ s", log)) == 2
    record = checkpoint["nnssl_probe"]
    assert sorted(record["dice"]) == [0, 1] and record["plans"] == "nnsslProbe_nnsslPlansTiny"
    assert 0 <= record["random_dice"] <= 1 and all(0 <= d <= 1 for d in record["dice"].values())
    assert (out / "progress.png").is_file()

    # the command on the final checkpoint, with the plans the run prepared: the same seeded probe as the run's last
    stdout, probed = probe_command(out / "checkpoint_final.pth", "nnsslProbe_nnsslPlansTiny", tmp_path / "probe.json")
    assert probed["pretrained"]["dice"] == record["dice"][1] and probed["random"]["dice"] == record["random_dice"]
    assert "held-out cases: 1 training case(s), 1 held out (case001)" in stdout
    assert probed["split"] == {"train": ["case000"], "heldout": ["case001"],
                               "source": "last case held out (2 cases, fewer than 5)"}


def test_periodic_probe_leaves_weights_losses_optimizer_and_random_streams_unchanged(probed_run,
                                                                                     tiny_pretraining_dataset,
                                                                                     tmp_path):
    _, with_probe, _ = probed_run
    _, without, log = pretrain(tiny_pretraining_dataset, tmp_path)
    assert "probe Dice" not in log and "nnssl_probe" not in without
    for key, value in without["network_weights"].items():
        assert torch.equal(value, with_probe["network_weights"][key]), key
    for key in ("train_losses", "val_losses"):
        assert with_probe["logging"][key] == without["logging"][key]
    momentum = [s["momentum_buffer"] for s in without["optimizer_state"]["state"].values()]
    assert momentum and all(torch.equal(a, s["momentum_buffer"]) for a, s in
                            zip(momentum, with_probe["optimizer_state"]["state"].values()))
    streams = with_probe["nnssl_run_state"]["ranks"][0]["random_streams"]
    streams_off = without["nnssl_run_state"]["ranks"][0]["random_streams"]
    assert streams["python"] == streams_off["python"] and torch.equal(streams["torch"], streams_off["torch"])
    assert torch.equal(streams["numpy"]["keys"], streams_off["numpy"]["keys"])


def primus_checkpoint(dirs, path):
    """A Primus 'pretraining' checkpoint of the tiny Primus preset (random weights, seed 1) with the adaptation plan
    a pretraining run on the shared dataset writes."""
    from nnssl.architectures import network_from_configuration
    from nnssl.finetuning.adaptation_plan import build_adaptation_plan
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((dirs["nnUNet_preprocessed"] / TINY_DATASET / "nnsslPlansPrimusTiny.json").read_text())
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    torch.manual_seed(1)
    network = network_from_configuration(configuration, 1, 1)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "PrimusMAEPretrainTrainer",
                "nnssl_adaptation_plan": build_adaptation_plan(plans, "3d_fullres", 1, configuration.patch_size)},
               path)


def test_nnssl_probe_on_a_primus_checkpoint(tiny_pretraining_dataset, tmp_path):
    checkpoint = tmp_path / "primus.pth"
    primus_checkpoint(tiny_pretraining_dataset, checkpoint)
    # the pretraining plans themselves (already preprocessed; planning on the fly is tested above)
    stdout, record = probe_command(checkpoint, "nnsslPlansPrimusTiny", tmp_path / "primus.json", "--seed", "3")
    assert "not prepared yet" not in stdout and "patch [64, 64, 64]" in stdout
    assert record["settings"] == {"iterations": PROBE_ITERATIONS, "batch_size": 2, "learning_rate": 1e-3, "seed": 3}
    assert {"stem", "encoder"} <= {line.rsplit(" ", 1)[-1] for line in record["transfer"]
                                   if line.startswith("loaded")}, record["transfer"]


def test_the_split_is_splits_final_fold_0_else_nnunets_seeded_fold_0_else_the_last_case(tmp_path):
    from nnssl.errors import UserError
    from nnssl.probe.data import probe_split

    splits = tmp_path / "splits_final.json"
    assert probe_split(["b", "a", "c"], str(splits)).heldout == ["c"]
    five = probe_split([f"case{i}" for i in range(5)], str(splits))
    assert len(five.heldout) == 1 and len(five.train) == 4 and "seeded 5-fold" in five.source
    splits.write_text(json.dumps([{"train": ["a"], "val": ["b", "c"]}]))
    assert (probe_split(["a", "b", "c"], str(splits)).train, probe_split(["a", "b", "c"], str(splits)).heldout) == \
        (["a"], ["b", "c"])
    with pytest.raises(UserError, match="at least 2 labeled cases"):
        probe_split(["a"], str(tmp_path / "none.json"))


def test_progress_figure_draws_the_probe_dice_and_its_floor_beside_the_loss():
    from nnssl.methods.progress_figure import progress_figure

    logged = {"train_losses": [0.9, 0.7], "val_losses": [0.95, 0.8], "lrs": [1e-2, 9e-3],
              "epoch_start_timestamps": [0.0, 10.0], "epoch_end_timestamps": [9.0, 19.5]}
    figure = progress_figure(logged, {1: 0.55, 0: 0.4}, 0.3)
    assert [axis.get_ylabel() for axis in figure.axes] == ["loss", "time [s]", "learning rate",
                                                          "probe Dice (held-out)"]
    dice, floor = figure.axes[3].get_lines()
    assert (list(dice.get_xdata()), list(dice.get_ydata())) == ([0, 1], [0.4, 0.55])
    assert list(floor.get_ydata()) == [0.3, 0.3]
    assert [axis.get_ylabel() for axis in progress_figure(logged).axes] == ["loss", "time [s]", "learning rate"]


def test_a_random_floor_of_zero_gives_no_ratio_and_says_why():
    from nnssl.probe.cli import result_lines
    from nnssl.probe.run import ArmResult, ProbeResult
    from nnssl.probe.settings import ProbeSettings

    result = ProbeResult(ArmResult(0.38), ArmResult(0.0), ProbeSettings(), "split", [])
    assert result.ratio is None
    assert result_lines(result)[-1] == "ratio pretrained/random n/a (the random encoder's Dice is 0)"
    assert ProbeResult(ArmResult(0.6), ArmResult(0.4), ProbeSettings(), "split", []).ratio == pytest.approx(1.5)
