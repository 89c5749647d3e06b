"""Fine-tuning: nnssl_prepare_finetune, the warm-up trainers, loading rules and prediction (tiny preset, CPU)."""

import json

import pytest
import torch

from conftest import run_command, tiny_network, write_labeled_dataset
from nnssl.finetuning.recipe import DEFAULT_RECIPE

SMOKE_3 = {"nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}
# seeded runs take batchgenerators' ordered augmenter, whose forked workers deadlocked at nnU-Net's default threads
SEEDED_SMOKE_3 = {**SMOKE_3, "nnssl_seed": "0", "nnssl_val_disable_tta": "1"}


def tiny_plans_architecture() -> dict:
    from nnssl.presets import RESENC_TINY

    return RESENC_TINY.architecture()


def write_nnssl_layout_checkpoint(path, seed: int = 0) -> dict:
    """A checkpoint in nnssl's documented layout: Spark-style stale .conv/.norm aliases, a wrapper prefix, the
    adaptation plan with an 'onemmiso' pretraining configuration, citations."""
    torch.manual_seed(seed)
    arch = tiny_plans_architecture()
    network = tiny_network()
    weights = {}
    for key, value in network.state_dict().items():
        stale = ".conv." in key or ".norm." in key
        weights["_orig_mod." + key] = torch.randn_like(value) if stale else value.clone()
    checkpoint = {
        "network_weights": weights,
        "trainer_name": "BaseVariableSparkMAETrainer",
        "citations": ["nnssl layout test citation"],
        "nnssl_adaptation_plan": {
            "architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch["arch_kwargs"],
                                   "arch_kwargs_requiring_import": arch["_kw_requires_import"]},
            "pretrain_plan": {"configurations": {"onemmiso": {
                "spacing": [1.0, 1.0, 1.0], "patch_size": [64, 64, 64],
                "normalization_schemes": ["ZScoreNormalization"]}}},
            "pretrain_num_input_channels": 1,
            "recommended_downstream_patchsize": [64, 64, 64],
            "key_to_encoder": "encoder.stages",
            "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
            "key_to_lpe": None,
        },
    }
    torch.save(checkpoint, path)
    return network.state_dict()


def prepared_two_channel_dataset(nnunet_dirs, tmp_path):
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 41, "Down", shapes=[(36, 40, 38)] * 5,
                                   spacings=[(1.5, 1.0, 1.0), (1.0, 1.2, 1.0), (1.0, 1.0, 0.8), (1.2, 1.2, 1.2),
                                             (1.0, 1.0, 1.0)], num_channels=2)
    checkpoint = tmp_path / "nnssl_layout.pth"
    trained = write_nnssl_layout_checkpoint(checkpoint)
    run_command(["nnssl_prepare_finetune", "-d", 41, "-c", checkpoint, "-np", 1, "-npfp", 1])
    return folder, checkpoint, trained


def in_process_trainer(monkeypatch, trainer: str, fold: int = 0, **kwargs):
    """The trainer of dataset 41 built as ``nnUNetv2_train`` builds it, with the smoke-run schedule, on the CPU.

    Augmentation runs in this process (``nnUNet_n_proc_DA=0``): these tests step the trainer by hand and must not
    leave forked workers behind in pytest's process; the stock-command runs in this module use nnU-Net's workers."""
    from nnunetv2.run.run_training import get_trainer_from_args

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    for variable, value in SMOKE_3.items():
        monkeypatch.setenv(variable, value)
    return get_trainer_from_args("41", "3d_fullres", fold, trainer, "nnsslFinetunePlans", device=torch.device("cpu"),
                                 **kwargs)


@pytest.mark.slow
def test_prepare_and_warmup_stages_from_an_nnssl_layout_checkpoint(nnunet_dirs, tmp_path, monkeypatch):
    folder, checkpoint, trained = prepared_two_channel_dataset(nnunet_dirs, tmp_path)
    plans = json.loads((nnunet_dirs["nnUNet_preprocessed"] / folder.name / "nnsslFinetunePlans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["architecture"] == tiny_plans_architecture()
    assert config["spacing"] == [1.0, 1.0, 1.0] and config["patch_size"] == [64, 64, 64]
    assert config["data_identifier"] == "nnsslFinetunePlans_3d_fullres"
    assert plans["nnssl_pretrained"]["checkpoint"] == str(checkpoint)
    assert (nnunet_dirs["nnUNet_preprocessed"] / folder.name / "nnsslFinetunePlans_3d_fullres" / "case000.b2nd").exists()
    # the foundation planner on the downstream dataset gives the identical architecture
    run_command(["nnUNetv2_plan_experiment", "-d", 41, "-pl", "nnsslPlannerTiny"])
    tiny = json.loads((nnunet_dirs["nnUNet_preprocessed"] / folder.name / "nnsslPlansTiny.json").read_text())
    assert tiny["configurations"]["3d_fullres"]["architecture"] == config["architecture"]

    # in-process: per-iteration LR (6 iterations: 1 decoder warm-up, 1 whole-network warm-up, 4 of poly decay),
    # encoder (with replicated stem) bit-identical through the decoder warm-up, then learning
    trainer = in_process_trainer(monkeypatch, "nnsslFinetuneTrainer")
    trainer.on_train_start()
    network = trainer.network
    stem = network.encoder.stem.convs[0].conv.weight
    assert torch.allclose(stem, trained["encoder.stem.convs.0.all_modules.0.weight"].repeat(1, 2, 1, 1, 1) / 2)
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in network.decoder.stages.state_dict().items()}
    lrs, encoder_unchanged = [], []
    for epoch in range(3):
        trainer.on_train_epoch_start()
        for iteration in range(2):
            trainer.iteration_in_epoch = iteration  # what the training loop sets before each step
            trainer.train_step(next(trainer.dataloader_train))
            lrs.append({g["nnssl_part"]: g["lr"] for g in trainer.optimizer.param_groups})
            encoder_unchanged.append(all(torch.equal(v, encoder_before[k])
                                         for k, v in network.encoder.state_dict().items()))
            if len(lrs) == 1:
                assert any(not torch.equal(v, decoder_before[k])
                           for k, v in network.decoder.stages.state_dict().items())
        if epoch == 0:
            trainer.save_checkpoint(str(tmp_path / "after_epoch_0.pth"))  # as nnU-Net's on_epoch_end: save, then +1
        trainer.current_epoch += 1
    assert encoder_unchanged == [True] + [False] * 5
    peak = DEFAULT_RECIPE.peak_lr
    expected = [(peak, 0.0), (peak, peak)] + [(peak * (1 - k / 4) ** 0.9,) * 2 for k in range(4)]
    assert [(round(d["decoder"], 9), round(d["encoder"], 9)) for d in lrs] == \
        [(round(a, 9), round(b, 9)) for a, b in expected]
    assert trainer.enable_deep_supervision is DEFAULT_RECIPE.deep_supervision
    trainer.on_train_end()
    log = open(trainer.log_file).read()
    assert "pretrained stem + encoder; decoder warm-up 1 iterations (encoder frozen)" in log
    assert "Encoder unfrozen at iteration 1" in log

    # --c after a kill at the end of epoch 0: the resumed run continues at global iteration 2 for both groups
    resumed = in_process_trainer(monkeypatch, "nnsslFinetuneTrainer", continue_training=True)
    resumed.load_checkpoint(str(tmp_path / "after_epoch_0.pth"))
    assert resumed.current_epoch == 1
    resumed.on_train_epoch_start()
    assert {g["nnssl_part"]: g["lr"] for g in resumed.optimizer.param_groups} == pytest.approx(
        {"decoder": expected[2][0], "encoder": expected[2][1]})


@pytest.mark.slow
def test_scratch_twin_log_says_random_init_and_nothing_frozen(nnunet_dirs, tmp_path):
    folder, _, _ = prepared_two_channel_dataset(nnunet_dirs, tmp_path)
    run_command(["nnUNetv2_train", 41, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer_scratch", "-p",
                 "nnsslFinetunePlans", "-device", "cpu"], extra_env=SEEDED_SMOKE_3)
    model = (nnunet_dirs["nnUNet_results"] / folder.name / "nnsslFinetuneTrainer_scratch__nnsslFinetunePlans__3d_fullres"
             / "fold_0")
    log = next(model.glob("training_log_*.txt")).read_text()
    assert "random initialisation; whole-network warm-up 1 iterations, then poly decay to iteration 6" in log
    assert "frozen" not in log and "Pretrained weights" not in log
    assert "nnssl_val_disable_tta: validation without mirroring" in log
    assert (model / "validation" / "summary.json").is_file()
    checkpoint = torch.load(model / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)  # prediction still mirrors


def test_bad_checkpoints_give_clear_errors(nnunet_dirs, tmp_path):
    write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 42, "Bad", shapes=[(20, 20, 20)] * 2,
                          spacings=[(1.0, 1.0, 1.0)] * 2)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    result = run_command(["nnssl_prepare_finetune", "-d", 42, "-c", garbage], check=False)
    assert result.returncode == 1 and f"{garbage} cannot be read by torch.load" in result.stderr
    no_plan = tmp_path / "no_plan.pth"
    torch.save({"network_weights": {}}, no_plan)
    result = run_command(["nnssl_prepare_finetune", "-d", 42, "-c", no_plan], check=False)
    assert result.returncode == 1 and "has no 'nnssl_adaptation_plan'" in result.stderr
    result = run_command(["nnssl_prepare_finetune", "-d", 42, "-c", tmp_path / "missing.pth"], check=False)
    assert "does not exist" in result.stderr
    # weights that do not match the checkpoint's own adaptation plan: refused at planning, every key listed
    disagreeing = tmp_path / "disagreeing.pth"
    write_nnssl_layout_checkpoint(disagreeing)
    checkpoint = torch.load(disagreeing, weights_only=False)
    stem_key = "_orig_mod.encoder.stem.convs.0.all_modules.0.weight"
    checkpoint["network_weights"][stem_key] = torch.zeros(3, 1, 3, 3, 3)
    checkpoint["network_weights"]["_orig_mod.encoder.stages.1.blocks.7.conv1.all_modules.0.weight"] = torch.zeros(1)
    torch.save(checkpoint, disagreeing)
    result = run_command(["nnssl_prepare_finetune", "-d", 42, "-c", disagreeing], check=False)
    assert result.returncode == 1, result.stdout
    assert f"{disagreeing}: its weights do not match its own nnssl_adaptation_plan" in result.stderr
    assert "encoder.stem.convs.0.all_modules.0.weight: " in result.stderr and "(3, 1, 3, 3, 3)" in result.stderr
    assert "encoder.stages.1.blocks.7.conv1.all_modules.0.weight: in the" in result.stderr
    assert not (nnunet_dirs["nnUNet_preprocessed"] / "Dataset042_Bad" / "nnsslFinetunePlans.json").exists()


@pytest.mark.slow
def test_resume_and_validation_restore_their_own_checkpoint_without_the_pretrained_file(nnunet_dirs, tmp_path):
    """The pretrained checkpoint is read once, at the start of a fresh training; ``--c`` and ``--val`` work after it
    has been moved away."""
    folder, checkpoint, _ = prepared_two_channel_dataset(nnunet_dirs, tmp_path)
    train = ["nnUNetv2_train", 41, "3d_fullres", 0, "-tr", "nnsslFinetuneTrainer", "-p", "nnsslFinetunePlans",
             "-device", "cpu"]
    env = {**SMOKE_3, "nnssl_val_disable_tta": "1"}
    fresh = run_command(train, extra_env=env)
    assert f"Pretrained weights from {checkpoint}" in fresh.stdout
    checkpoint.rename(tmp_path / "moved_away.pth")
    resumed = run_command(train + ["--c"], extra_env={**env, "nnssl_num_epochs": "4"})
    assert "Pretrained weights from" not in resumed.stdout
    model = nnunet_dirs["nnUNet_results"] / folder.name / "nnsslFinetuneTrainer__nnsslFinetunePlans__3d_fullres" / \
        "fold_0"
    assert torch.load(model / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 4
    validated = run_command(train + ["--val"], extra_env=env)
    assert "Pretrained weights from" not in validated.stdout and (model / "validation" / "summary.json").exists()


def test_adaptation_modes_plan_the_spacing_they_promise(nnunet_dirs, tmp_path):
    """``-am like_pretrained`` (default), ``fixed -os``, ``default_nnunet`` and ``no_resample`` through the CLI."""
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 43, "Modes", shapes=[(20, 40, 40)] * 3,
                                   spacings=[(2.0, 1.0, 1.0)] * 3)
    checkpoint = tmp_path / "nnssl_layout.pth"
    write_nnssl_layout_checkpoint(checkpoint)
    modes = {"like_pretrained": [], "fixed": ["-os", 1.5, 0.5, 0.5], "default_nnunet": [], "no_resample": []}
    for mode, extra in modes.items():
        run_command(["nnssl_prepare_finetune", "-d", 43, "-c", checkpoint, "-am", mode, *extra, "-p", f"plans_{mode}",
                     "--no_pp", "-npfp", 1])
    config = {mode: json.loads((nnunet_dirs["nnUNet_preprocessed"] / folder.name / f"plans_{mode}.json").read_text())
              ["configurations"]["3d_fullres"] for mode in modes}
    assert config["like_pretrained"]["spacing"] == [1.0, 1.0, 1.0]  # the checkpoint's pretraining spacing
    assert config["fixed"]["spacing"] == [1.5, 0.5, 0.5]
    assert config["default_nnunet"]["spacing"] == [2.0, 1.0, 1.0]  # nnU-Net's choice: the dataset's median
    assert config["no_resample"]["resampling_fn_data"] == "no_resampling_hack"
    assert all(c["resampling_fn_data"] != "no_resampling_hack" for m, c in config.items() if m != "no_resample")
    assert all(c["architecture"] == tiny_plans_architecture() for c in config.values())


@pytest.mark.slow
def test_recipes_and_smoke_lengths_train_through_the_stock_command(nnunet_dirs, tmp_path, monkeypatch):
    """``_amaes``: AdamW with cosine decay and spatial-only augmentation; ``_encdec``: the decoder transferred too;
    ``_frozen``: the encoder never learns; the default at one epoch of two iterations, too short for its 1 + 1
    warm-up iterations and a decay: the schedule shrinks and says so. All seeded, at nnU-Net's default threads and
    augmentation workers."""
    folder, checkpoint, trained = prepared_two_channel_dataset(nnunet_dirs, tmp_path)
    one_epoch = {**SEEDED_SMOKE_3, "nnssl_num_epochs": "1"}
    results = nnunet_dirs["nnUNet_results"] / folder.name
    for trainer, env, expected in (
            ("nnsslFinetuneTrainer_amaes", SEEDED_SMOKE_3, "pretrained stem + encoder; cosine decay to iteration 6; "
                                                           "peak LR 0.0001, adamw, deep supervision off"),
            ("nnsslFinetuneTrainer_encdec", SEEDED_SMOKE_3, "pretrained stem + encoder + decoder; whole-network "
                                                            "warm-up 1 iterations"),
            ("nnsslFinetuneTrainer_frozen", SEEDED_SMOKE_3, "deep supervision off; encoder frozen throughout"),
            ("nnsslFinetuneTrainer", one_epoch, "decoder warm-up 1 iterations (encoder frozen), then poly decay to "
                                                "iteration 2; peak LR 0.01, sgd, deep supervision off (shrunk to "
                                                "fit a 2-iteration run: the recipe's warm-up lengths in iterations, "
                                                "1 + 1, leave no iteration to decay in; now 1 + 0)")):
        run_command(["nnUNetv2_train", 41, "3d_fullres", 0, "-tr", trainer, "-p", "nnsslFinetunePlans", "-device",
                     "cpu"], extra_env=env)
        output = results / f"{trainer}__nnsslFinetunePlans__3d_fullres" / "fold_0"
        log = next(output.glob("training_log_*")).read_text()
        assert expected in log, log[-3000:]
        assert (output / "checkpoint_final.pth").is_file()
    frozen = torch.load(results / "nnsslFinetuneTrainer_frozen__nnsslFinetunePlans__3d_fullres" / "fold_0" /
                        "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert all(torch.equal(value, trained[key]) for key, value in frozen.items()
               if key.startswith("encoder.stages.") and ".all_modules." in key)

    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    amaes = in_process_trainer(monkeypatch, "nnsslFinetuneTrainer_amaes")
    amaes.initialize()
    assert isinstance(amaes.optimizer, torch.optim.AdamW) and amaes.optimizer.defaults["amsgrad"]
    rotation, dummy_2d, _, mirror = amaes.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    pipeline = amaes.get_training_transforms(amaes.configuration_manager.patch_size, rotation, None, mirror, dummy_2d)
    kinds = {type(t) for t in pipeline.transforms} | {type(t) for c in pipeline.transforms
                                                      for t in getattr(c, "transforms", [])}
    assert SpatialTransform in kinds and GaussianNoiseTransform not in kinds

    encdec = in_process_trainer(monkeypatch, "nnsslFinetuneTrainer_encdec", fold=1)
    encdec.on_train_start()
    decoder = encdec.network.decoder.stages.state_dict()
    assert all(torch.equal(value, trained[f"decoder.stages.{key}"]) for key, value in decoder.items()
               if ".all_modules." in key)
    encdec.on_train_end()


@pytest.mark.slow
def test_dynamic_architecture_plans_like_nnunet_and_loads_what_fits(nnunet_dirs, tmp_path):
    """``nnssl_prepare_finetune --architecture dynamic`` on anisotropic data (3 mm slices, 0.8 mm in-plane):
    nnU-Net's ResEnc topology at the checkpoint's widths, then one epoch of ``nnUNetv2_train`` whose log holds the
    dynamic-adaptation table (stage 0 kernels averaged to 1x3x3, the checkpoint's deepest stage unused)."""
    from nnssl.errors import InvalidValueError, UserError
    from nnssl.plans.dynamic_finetune_planner import nnsslDynamicFinetunePlanner

    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 44, "Aniso", shapes=[(12, 40, 40)] * 2,
                                   spacings=[(3.0, 0.8, 0.8)] * 2)
    checkpoint = tmp_path / "nnssl_layout.pth"
    write_nnssl_layout_checkpoint(checkpoint)
    run_command(["nnssl_prepare_finetune", "-d", 44, "-c", checkpoint, "--architecture", "dynamic", "-np", 1,
                 "-npfp", 1])
    plans = json.loads((nnunet_dirs["nnUNet_preprocessed"] / folder.name / "nnsslDynamicFinetunePlans.json")
                       .read_text())
    config = plans["configurations"]["3d_fullres"]
    kwargs, pretrained = config["architecture"]["arch_kwargs"], tiny_plans_architecture()["arch_kwargs"]
    assert plans["nnssl_pretrained"]["architecture"] == "dynamic"
    assert config["spacing"] == pytest.approx([3.0, 0.8, 0.8]) and config["normalization_schemes"] == ["ZScoreNormalization"]
    assert config["data_identifier"] == "nnsslDynamicFinetunePlans_3d_fullres"
    assert config["patch_size"][0] < config["patch_size"][1] and kwargs["n_stages"] < pretrained["n_stages"]
    assert kwargs["kernel_sizes"][0] == [1, 3, 3] and kwargs["strides"][1] == [1, 2, 2]
    assert kwargs["features_per_stage"] == pretrained["features_per_stage"][:kwargs["n_stages"]]
    assert kwargs["n_blocks_per_stage"] == pretrained["n_blocks_per_stage"][:kwargs["n_stages"]]

    run_command(["nnUNetv2_train", 44, "3d_fullres", "all", "-tr", "nnsslFinetuneTrainer", "-p",
                 "nnsslDynamicFinetunePlans", "-device", "cpu"], extra_env={**SEEDED_SMOKE_3, "nnssl_num_epochs": "1"})
    model = nnunet_dirs["nnUNet_results"] / folder.name / \
        "nnsslFinetuneTrainer__nnsslDynamicFinetunePlans__3d_fullres" / "fold_all"
    log = next(model.glob("training_log_*.txt")).read_text()
    assert "dynamic adaptation (tensors;" in log, log[-3000:]
    total = next(line for line in log.splitlines() if " total " in line).split()
    assert int(total[-4]) > 0 and int(total[-1]) > 0  # loaded; unused (the checkpoint's deeper stages)
    assert "encoder.stem.convs.0.conv.weight: kernel (3, 3, 3) -> (1, 3, 3) averaged over axis 0" in log
    assert f"is deeper than the network's {kwargs['n_stages']} stages" in log
    assert (model / "checkpoint_final.pth").is_file()

    from nnunetv2.run.run_training import get_trainer_from_args

    encdec = get_trainer_from_args("44", "3d_fullres", "all", "nnsslFinetuneTrainer_encdec",
                                   "nnsslDynamicFinetunePlans", device=torch.device("cpu"))
    encdec.initialize()
    with pytest.raises(UserError, match="transfers the pretrained decoder, but the plans nnsslDynamicFinetunePlans"):
        encdec._load_pretrained_weights()
    primus = {"nnssl_adaptation_plan": {"architecture_plans": {"arch_class_name": "PrimusM"},
                                        "recommended_downstream_patchsize": [64, 64, 64]}}
    with pytest.raises(InvalidValueError, match="holds a Primus. A Primus keeps its pretraining architecture"):
        nnsslDynamicFinetunePlanner(44, str(checkpoint), primus, "default_nnunet")
