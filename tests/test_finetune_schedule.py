"""Per-iteration fine-tuning learning rates (nnssl.finetune_schedule)."""

import pytest

from nnssl.finetune_schedule import FinetuneSchedule


def test_three_stages_per_iteration():
    s = FinetuneSchedule(peak_lr=1e-3, num_epochs=1000, iterations_per_epoch=250)
    ramp = 50 * 250
    assert s.lr(0, 0) == pytest.approx(1e-3 / ramp) and s.encoder_lr(0, 0) == 0.0
    assert s.lr(24, 249) == pytest.approx(1e-3 * 25 * 250 / ramp)
    assert s.lr(49, 249) == pytest.approx(1e-3) and s.encoder_lr(49, 249) == 0.0
    assert s.lr(50, 0) == pytest.approx(1e-3 / ramp) == s.encoder_lr(50, 0)
    assert s.lr(99, 249) == pytest.approx(1e-3)
    assert s.lr(100, 0) == pytest.approx(1e-3)
    assert s.lr(550, 0) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert 0 < s.lr(999, 249) < 1e-7
    assert [s.stage(e) for e in (0, 49, 50, 99, 100, 999)] == [1, 1, 2, 2, 3, 3]
    lrs = [s.lr(e, i) for e in range(100, 1000, 50) for i in (0, 125)]
    assert lrs == sorted(lrs, reverse=True)


def test_variants_frozen_cosine_and_no_warmup():
    frozen = FinetuneSchedule(peak_lr=1e-3, num_epochs=300, iterations_per_epoch=10, freeze_encoder_throughout=True)
    assert all(frozen.encoder_lr(e, 3) == 0.0 for e in range(300))
    cosine = FinetuneSchedule(peak_lr=1e-4, num_epochs=100, iterations_per_epoch=10, decoder_warmup_epochs=0,
                              full_warmup_epochs=0, decay="cosine")
    assert cosine.lr(0, 0) == pytest.approx(1e-4) and cosine.lr(50, 0) == pytest.approx(5e-5)
    unfrozen = FinetuneSchedule(peak_lr=1e-3, num_epochs=300, iterations_per_epoch=10,
                                freeze_encoder_in_decoder_warmup=False)
    assert unfrozen.encoder_lr(3, 4) == unfrozen.lr(3, 4) > 0


def test_short_runs_scale_the_warmups_and_150_epochs_keep_them():
    assert (FinetuneSchedule.fitted_to(150, peak_lr=1e-3, iterations_per_epoch=1).full_warmup_epochs) == 50
    smoke = FinetuneSchedule.fitted_to(3, peak_lr=1e-3, iterations_per_epoch=2)
    assert [smoke.stage(e) for e in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError, match="leave no training stage"):
        FinetuneSchedule(peak_lr=1e-3, num_epochs=80, iterations_per_epoch=1)
