"""Fine-tuning recipes and their per-iteration learning rates (nnssl.finetuning.recipe, nnssl.finetuning.schedule)."""

from dataclasses import replace

import pytest

from nnssl.finetuning.recipe import DEFAULT_RECIPE, PAPER_RECIPE, FinetuneRecipe
from nnssl.finetuning.schedule import FinetuneSchedule


def test_full_length_paper_run_keeps_the_papers_12500_plus_12500_warmups():
    s = FinetuneSchedule(PAPER_RECIPE, total_iterations=1000 * 250)
    assert (s.decoder_warmup_iterations, s.full_warmup_iterations) == (12500, 12500)
    assert s.lr(0) == pytest.approx(1e-3 / 12500) and s.encoder_lr(0) == 0.0
    assert s.lr(12499) == pytest.approx(1e-3) and s.encoder_lr(12499) == 0.0
    assert s.lr(12500) == pytest.approx(1e-3 / 12500) == s.encoder_lr(12500)
    assert s.unfreeze_step == 12500
    assert s.lr(24999) == pytest.approx(1e-3) and s.lr(25000) == pytest.approx(1e-3)
    assert s.lr(25000 + 112500) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert 0 < s.lr(249999) < 1e-7
    assert [s.stage(i) for i in (0, 12499, 12500, 24999, 25000, 249999)] == [1, 1, 2, 2, 3, 3]
    decay = [s.lr(i) for i in range(25000, 250000, 5000)]
    assert decay == sorted(decay, reverse=True)


def test_short_runs_have_the_same_shape_and_most_iterations_at_high_lr():
    smoke = FinetuneSchedule(DEFAULT_RECIPE, total_iterations=100)  # 5 epochs x 20 iterations
    assert (smoke.decoder_warmup_iterations, smoke.full_warmup_iterations) == (5, 5)
    assert [smoke.stage(i) for i in (4, 5, 9, 10)] == [1, 2, 2, 3]
    # the old whole-epoch warm-ups spent 40 % of such a run ramping; now the summed LR is close to nnU-Net's poly
    assert sum(smoke.lr(i) for i in range(100)) > 0.5 * sum(1e-2 * (1 - i / 100) ** 0.9 for i in range(100))
    tiny = FinetuneSchedule(DEFAULT_RECIPE, total_iterations=6)
    assert (tiny.decoder_warmup_iterations, tiny.full_warmup_iterations) == (1, 1)
    assert "shrunk" not in tiny.describe()


def test_smoke_runs_too_short_for_the_warmups_shrink_them_and_say_so():
    two = FinetuneSchedule(DEFAULT_RECIPE, total_iterations=2)  # the recipe asks for 1 + 1 warm-up iterations
    assert (two.decoder_warmup_iterations, two.full_warmup_iterations) == (1, 0)
    assert two.encoder_lr(0) == 0.0 and two.lr(0) == pytest.approx(1e-2) and two.unfreeze_step == 1
    assert two.stage(1) == 3 and two.encoder_lr(1) == two.lr(1) == pytest.approx(1e-2)
    assert "shrunk to fit a 2-iteration run: the recipe's warm-up lengths in iterations, 1 + 1," in two.describe()
    assert "leave no iteration to decay in; now 1 + 0)" in two.describe()
    one = FinetuneSchedule(DEFAULT_RECIPE, total_iterations=1)
    assert (one.decoder_warmup_iterations, one.full_warmup_iterations, one.unfreeze_step) == (0, 0, None)
    assert one.encoder_lr(0) == one.lr(0) == pytest.approx(1e-2)
    long = FinetuneSchedule(replace(DEFAULT_RECIPE, decoder_warmup_fraction=0.3, full_warmup_fraction=0.3), 3)
    assert (long.decoder_warmup_iterations, long.full_warmup_iterations) == (1, 1) and "shrunk" not in long.describe()


def test_pretraining_epoch_schedule_shrinks_its_warmup_for_a_one_epoch_run():
    import torch

    from nnssl.lr_schedule import EpochLRScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    full = EpochLRScheduler(optimizer, 3e-4, 0.1, "poly", 1000)  # Primus MAE: 100 warm-up epochs
    assert full.warmup_epochs == 100 and "shrunk" not in full.describe()
    one = EpochLRScheduler(optimizer, 3e-4, 0.1, "poly", 1)
    assert one.warmup_epochs == 0 and one.lr(0) == pytest.approx(3e-4)
    assert "shrunk to fit a 1-epoch run: the recipe's warm-up lengths in epochs, 1, leave no epoch" in one.describe()
    two = EpochLRScheduler(optimizer, 3e-4, 0.1, "poly", 2)
    assert two.warmup_epochs == 1 and "shrunk" not in two.describe()


def test_scratch_twin_has_no_decoder_ramp_and_nothing_frozen():
    scratch = FinetuneSchedule(DEFAULT_RECIPE.from_scratch(), total_iterations=200)
    assert scratch.decoder_warmup_iterations == 0 and scratch.full_warmup_iterations == 10
    assert scratch.unfreeze_step is None
    assert all(scratch.encoder_lr(i) == scratch.lr(i) > 0 for i in range(200))
    assert "random initialisation" in scratch.describe() and "frozen" not in scratch.describe()
    assert "encoder frozen" in FinetuneSchedule(DEFAULT_RECIPE, 200).describe()


def test_variants_frozen_cosine_and_invalid_choices():
    frozen = FinetuneSchedule(replace(DEFAULT_RECIPE, freeze_encoder_throughout=True), total_iterations=300)
    assert all(frozen.encoder_lr(i) == 0.0 for i in range(300)) and frozen.unfreeze_step is None
    cosine = FinetuneSchedule(replace(DEFAULT_RECIPE, peak_lr=1e-4, decay="cosine", decoder_warmup_fraction=0,
                                      full_warmup_fraction=0), total_iterations=100)
    assert cosine.lr(0) == pytest.approx(1e-4) and cosine.lr(50) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneRecipe(optimizer="adam")
    with pytest.raises(ValueError, match="decay"):
        FinetuneRecipe(decay="step")
    with pytest.raises(ValueError, match="no decay stage"):
        FinetuneRecipe(decoder_warmup_fraction=0.5, full_warmup_fraction=0.5)
    with pytest.raises(ValueError, match="transfer_parts"):
        FinetuneRecipe(transfer_parts=("encoder", "head"))


def test_warmup_ablation_variants_start_at_the_peak_or_ramp_twice_as_long():
    from nnssl.trainers.finetune import nnsslFinetuneTrainer_nowarmup, nnsslFinetuneTrainer_warmup10

    none = FinetuneSchedule(nnsslFinetuneTrainer_nowarmup.recipe, total_iterations=200)
    assert (none.decoder_warmup_iterations, none.full_warmup_iterations) == (0, 0) and none.unfreeze_step is None
    assert none.lr(0) == none.encoder_lr(0) == pytest.approx(1e-2)
    assert "frozen" not in none.describe()
    doubled = FinetuneSchedule(nnsslFinetuneTrainer_warmup10.recipe, total_iterations=200)
    assert (doubled.decoder_warmup_iterations, doubled.full_warmup_iterations) == (20, 20)
    assert doubled.encoder_lr(19) == 0.0 < doubled.encoder_lr(20) and doubled.lr(39) == pytest.approx(1e-2)
