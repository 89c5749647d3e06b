"""Dynamic adaptation (nnssl.finetuning.dynamic_transfer): which pretrained tensors load, adapt or stay fresh when
the downstream ResEnc has fewer or more stages, other kernels, blocks or widths than the pretrained one."""

import pytest
import torch

from nnssl.finetuning.adaptation_plan import KEYS_TO_IN_PROJ
from nnssl.finetuning.dynamic_transfer import dynamic_transfer
from nnssl.finetuning.transfer import PretrainedWeightsError, replicate_input_channels

PLAN = {"key_to_stem": "encoder.stem", "key_to_encoder": "encoder.stages", "keys_to_in_proj": list(KEYS_TO_IN_PROJ)}
STEM_KEYS = ("conv.weight", "conv.bias", "norm.weight", "norm.bias")


def resenc(kernels, blocks=None, input_channels: int = 1, features=(4, 8, 16, 16, 16)):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    n = len(kernels)
    return ResidualEncoderUNet(input_channels, n, features[:n], torch.nn.Conv3d, kernels,
                               [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), blocks or (1,) * n, 2, (1,) * (n - 1),
                               conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU)


def encoder_items(network):
    return {k: v for k, v in network.state_dict().items() if k.startswith("encoder.") and ".all_modules." not in k}


def test_fewer_stages_anisotropic_kernel_and_more_channels():
    """4 pretrained stages into 3 with a 1x3x3 stem and stage 0 and two input channels: the 1x3x3 kernels are the
    pretrained ones averaged over axis 0 (the stem also replicated), stages 1-2 load as they are, stage 3 is unused."""
    source = resenc([[3, 3, 3]] * 4)
    target = resenc([[1, 3, 3], [3, 3, 3], [3, 3, 3]], input_channels=2)
    decoder_before = {k: v.clone() for k, v in target.decoder.stages.state_dict().items()}
    report = dynamic_transfer(target, source.state_dict(), PLAN)
    counts = {row: tuple(c.values()) for row, c in report.counts.items()}  # loaded, adapted, fresh, unused
    assert counts["stem"] == (3, 1, 0, 0) and counts["encoder stage 0"] == (6, 2, 0, 0)
    assert counts["encoder stage 1"] == counts["encoder stage 2"] == (11, 0, 0, 0)
    assert counts["encoder stage 3"] == (0, 0, 0, 8) and report.fresh == {}
    assert report.unused == {"encoder.stages.3.blocks.0.*": (8, "stage 3 is deeper than the network's 3 stages")}
    pretrained, loaded = source.state_dict(), encoder_items(target)
    stem = "encoder.stem.convs.0.conv.weight"
    assert torch.allclose(loaded[stem], replicate_input_channels(pretrained[stem], 2).mean(2, keepdim=True))
    conv = "encoder.stages.0.blocks.0.conv1.conv.weight"
    assert torch.allclose(loaded[conv], pretrained[conv].mean(2, keepdim=True))
    for key, value in loaded.items():
        if key.startswith("encoder.stages.") and not key.startswith("encoder.stages.0.blocks.0.conv"):
            assert torch.equal(value, pretrained[key]), key
    assert all(torch.equal(v, decoder_before[k]) for k, v in target.decoder.stages.state_dict().items())
    table = [line.split() for line in report.table()]
    assert ["encoder", "stage", "3", "0", "0", "0", "8"] in table and ["total", "31", "3", "16", "8"] in table


def test_more_stages_more_blocks_and_an_unmatched_kernel_stay_fresh():
    """4 pretrained stages (stage 3 with 1x3x3 kernels) into 5 (3x3x3) with two blocks in stage 1: the extra block,
    stage 4 and stage 3's convs (1 -> 3 cannot be made up) stay fresh, with the reason; everything else loads."""
    source = resenc([[3, 3, 3]] * 3 + [[1, 3, 3]])
    target = resenc([[3, 3, 3]] * 5, blocks=(1, 2, 1, 1, 1))
    fresh_before = {k: v.clone() for k, v in encoder_items(target).items()}
    report = dynamic_transfer(target, source.state_dict(), PLAN)
    counts = {row: tuple(c.values()) for row, c in report.counts.items()}
    assert counts["stem"] == (4, 0, 0, 0) and counts["encoder stage 1"] == (11, 0, 8, 0)
    assert counts["encoder stage 3"] == (6, 0, 2, 2) and counts["encoder stage 4"] == (0, 0, 8, 0)
    assert report.fresh["encoder.stages.1.blocks.1.*"] == (8, "block 1 is deeper than the checkpoint's 1 blocks in "
                                                              "stage 1")
    assert report.fresh["encoder.stages.4.blocks.0.*"] == (8, "stage 4 is deeper than the checkpoint's 4 stages")
    assert report.fresh["encoder.stages.3.blocks.0.*"] == (2, "shape (16, 16, 1, 3, 3) in the checkpoint vs "
                                                              "(16, 16, 3, 3, 3) in the network")
    assert report.unused == {"encoder.stages.3.blocks.0.*": (2, "did not fit")} and not report.adapted
    pretrained = source.state_dict()
    for key, value in encoder_items(target).items():
        fresh = key.startswith(("encoder.stages.1.blocks.1.", "encoder.stages.4.")) or \
            key.startswith("encoder.stages.3.blocks.0.conv") and key.endswith("conv.weight")
        assert torch.equal(value, fresh_before[key] if fresh else pretrained[key]), key


def test_no_fitting_encoder_tensor_is_refused_with_the_table():
    source = resenc([[3, 3, 3]] * 3)
    target = resenc([[3, 3, 3]] * 3, features=(6, 12, 24))
    with pytest.raises(PretrainedWeightsError, match="not one pretrained encoder tensor fits") as error:
        dynamic_transfer(target, source.state_dict(), PLAN)
    assert ["encoder", "stage", "2", "0", "0", "11", "11"] in [line.split() for line in str(error.value).splitlines()]
