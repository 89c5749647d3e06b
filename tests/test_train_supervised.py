"""Stock nnUNetv2_train with nnssl's supervised trainer on the tiny preset (CPU): epoch variants + smoke variables."""

from conftest import TINY_DATASET, TINY_DATASET_ID, run_command

SMOKE = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnssl_val_iterations_per_epoch": "1"}


def test_supervised_trainer_variant_with_smoke_variables(tiny_pretraining_dataset):
    # the _5epochs variant would run 5 epochs; the smoke variable wins. nnssl_torch_threads=1 because this test
    # checks that the override applies (nnU-Net's default thread count is run by test_seeding and the README test)
    run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "nnsslTrainer_5epochs", "-p",
                 "nnsslPlansTiny", "-device", "cpu"], extra_env={**SMOKE, "nnssl_torch_threads": "1"})
    model_dir = (tiny_pretraining_dataset["nnUNet_results"] / TINY_DATASET
                 / "nnsslTrainer_5epochs__nnsslPlansTiny__3d_fullres" / "fold_all")
    log = next(model_dir.glob("training_log_*.txt")).read_text()
    assert "nnssl schedule overrides from the environment: {'num_epochs': 1" in log
    assert "Epoch 0" in log and "Epoch 1" not in log
    assert "nnssl_torch_threads: torch uses 1 intra-op thread(s)" in log  # nnU-Net alone sets one per core
    assert (model_dir / "checkpoint_final.pth").is_file()
    assert (model_dir / "validation" / "summary.json").is_file()



def test_a_bad_thread_count_stops_the_run_naming_the_variable(tiny_pretraining_dataset):
    result = run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "nnsslTrainer", "-p",
                          "nnsslPlansTiny", "-device", "cpu"], extra_env={**SMOKE, "nnssl_torch_threads": "two"},
                         check=False)
    assert result.returncode != 0
    assert "nnssl_torch_threads='two' is not a whole number" in result.stdout + result.stderr
