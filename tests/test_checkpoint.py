"""The pretraining checkpoint as pure functions: nnU-Net's own keys plus nnssl's, and a lossless round trip."""

from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.integration.checkpoint import CHECKPOINT_KEYS, PretrainingCheckpoint, checkpoint_dict, checkpoint_from_dict


def nnunet_checkpoint_keys(tmp_path) -> set:
    """What released nnU-Net's ``save_checkpoint`` writes, from the method itself on a minimal trainer state."""
    network = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(local_rank=0, disable_checkpointing=False, is_ddp=False, network=network,
                              optimizer=torch.optim.SGD(network.parameters(), lr=0.1), grad_scaler=None,
                              logger=LocalLogger(), _best_ema=None, current_epoch=3, my_init_kwargs={},
                              inference_allowed_mirroring_axes=(0, 1, 2))
    nnUNetTrainer.save_checkpoint(trainer, str(tmp_path / "nnunet.pth"))
    return set(torch.load(tmp_path / "nnunet.pth", weights_only=False))


def example(**changes) -> PretrainingCheckpoint:
    network = torch.nn.Linear(2, 2)
    fields = dict(network_weights=network.state_dict(), pretraining_weights={"mask_token": torch.zeros(1, 4)},
                  optimizer_state=torch.optim.SGD(network.parameters(), lr=0.1).state_dict(), grad_scaler_state=None,
                  logging=LocalLogger().get_checkpoint(), best_ema=0.5, next_epoch=4, init_args={"fold": "all"},
                  trainer_name="S3DPretrainTrainer", inference_allowed_mirroring_axes=(0, 1, 2), best_val_loss=0.4,
                  trainer_state={"mask_sampler": {}}, adaptation_plan={"key_to_encoder": "encoder.stages"},
                  citations=[{"type": "framework", "name": "nnU-Net", "apa_citations": ["..."],
                              "bibtex_citations": ["..."]}])
    return PretrainingCheckpoint(**{**fields, **changes})


def test_keys_contain_nnunets_own_and_round_trip(tmp_path):
    original = example()
    written = checkpoint_dict(original)
    nnunet_keys = nnunet_checkpoint_keys(tmp_path)
    assert nnunet_keys <= set(written) and nnunet_keys == set(list(CHECKPOINT_KEYS)[:len(nnunet_keys)])
    assert set(written) - nnunet_keys == {"nnssl_pretraining_weights", "nnssl_best_val_loss", "nnssl_trainer_state",
                                          "nnssl_adaptation_plan", "citations"}
    torch.save(written, tmp_path / "ours.pth")
    restored = checkpoint_from_dict(torch.load(tmp_path / "ours.pth", weights_only=False), "ours.pth")
    for field in CHECKPOINT_KEYS.values():
        a, b = getattr(restored, field), getattr(original, field)
        if field.endswith("weights"):
            assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert a == b, field


def test_network_weights_are_written_on_the_cpu():
    weights = {"w": torch.ones(2, requires_grad=True)}
    written = checkpoint_dict(example(network_weights=weights))
    assert written["network_weights"]["w"].device.type == "cpu" and not written["network_weights"]["w"].requires_grad


def test_a_supervised_checkpoint_is_refused_naming_the_file_and_the_missing_keys(tmp_path):
    with pytest.raises(RuntimeError, match=r"final\.pth is not an nnssl pretraining checkpoint \(missing "
                                           r"nnssl_pretraining_weights, nnssl_best_val_loss, nnssl_trainer_state, "
                                           r"nnssl_adaptation_plan, citations\)"):
        checkpoint_from_dict({key: None for key in nnunet_checkpoint_keys(tmp_path)}, "final.pth")
