"""Stock nnUNetv2_train with nnssl's supervised trainer on the tiny preset (CPU): epoch variants + smoke variables."""

from conftest import run_command, write_labeled_dataset

SMOKE = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


def test_supervised_trainer_variant_with_smoke_variables(nnunet_dirs):
    folder = write_labeled_dataset(nnunet_dirs["nnUNet_raw"], 21, "Sup", shapes=[(30, 34, 32)] * 5,
                                   spacings=[(1.0, 1.0, 1.0), (1.2, 1.0, 1.0), (1.0, 0.9, 1.1), (1.0, 1.0, 1.0),
                                             (0.9, 1.0, 1.0)])
    run_command(["nnUNetv2_plan_and_preprocess", "-d", 21, "-pl", "nnsslPlannerTiny", "-c", "3d_fullres",
                 "-np", 1, "-npfp", 1, "--no_pbar"])
    # the _5epochs variant would run 5 epochs; the smoke variable wins
    run_command(["nnUNetv2_train", 21, "3d_fullres", 0, "-tr", "nnsslTrainer_5epochs", "-p", "nnsslPlansTiny",
                 "-device", "cpu"], extra_env=SMOKE)
    model_dir = nnunet_dirs["nnUNet_results"] / folder.name / "nnsslTrainer_5epochs__nnsslPlansTiny__3d_fullres"
    log = next((model_dir / "fold_0").glob("training_log_*.txt")).read_text()
    assert "nnssl schedule overrides from the environment: {'num_epochs': 1" in log
    assert "Epoch 0" in log and "Epoch 1" not in log
    assert (model_dir / "fold_0" / "checkpoint_final.pth").is_file()
    assert (model_dir / "fold_0" / "validation" / "summary.json").is_file()
