"""Loading rules for pretrained weights (nnssl.finetuning.transfer) on the tiny ResEnc network."""

import pytest
import torch

from nnssl.finetuning.adaptation_plan import KEYS_TO_IN_PROJ
from nnssl.finetuning.transfer import (PretrainedWeightsError, canonical_state_dict, replicate_input_channels,
                                       transfer_pretrained_weights)

PLAN = {"key_to_stem": "encoder.stem", "key_to_encoder": "encoder.stages", "keys_to_in_proj": list(KEYS_TO_IN_PROJ)}


def tiny_network(input_channels: int = 1, num_classes: int = 1):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    return ResidualEncoderUNet(input_channels, 4, (4, 8, 16, 16), torch.nn.Conv3d, 3, (1, 2, 2, 2), (1, 1, 1, 1),
                               num_classes, (1, 1, 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                               nonlin_kwargs={"inplace": True})


def spark_style_weights(source: torch.nn.Module) -> dict:
    """nnssl's Spark layout: trained tensors under all_modules.*, stale (random) ones under .conv/.norm, wrapped."""
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for key in list(state):
        if ".conv." in key or ".norm." in key:
            state[key] = torch.randn_like(state[key])
    return {"module." + k: v for k, v in state.items()}


def test_all_modules_aliases_win_and_wrapper_prefixes_are_stripped():
    source = tiny_network()
    canonical = canonical_state_dict(spark_style_weights(source))
    for key, value in source.state_dict().items():
        assert torch.equal(canonical[key], value), key


def test_stem_and_encoder_transfer_decoder_stays_fresh_and_report_counts():
    source, target = tiny_network(), tiny_network(num_classes=3)
    decoder_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("decoder.stages")}
    report = transfer_pretrained_weights(target, spark_style_weights(source), PLAN)
    for key, value in target.state_dict().items():
        if key.startswith(("encoder.stem", "encoder.stages")):
            assert torch.equal(value, source.state_dict()[key]), key
    for key, value in decoder_before.items():
        assert torch.equal(target.state_dict()[key], value)
    n_stem = len({p.data_ptr() for p in target.encoder.stem.state_dict().values()})
    n_encoder = len({p.data_ptr() for p in target.encoder.stages.state_dict().values()})
    assert report.loaded == {"stem": n_stem, "encoder": n_encoder} and n_stem == 4
    assert report.skipped["decoder.encoder.*"][0] == sum(k.startswith("decoder.encoder.") for k in target.state_dict())
    assert "fresh decoder" in report.skipped["decoder.*"][1]
    x = torch.randn(1, 1, 16, 16, 16)
    for a, b in zip(source.encoder(x), target.encoder(x)):
        assert torch.allclose(a, b)


def test_multi_channel_stem_replication_keeps_the_response_to_identical_channels():
    source, target = tiny_network(), tiny_network(input_channels=3)
    report = transfer_pretrained_weights(target, source.state_dict(), PLAN)
    assert any("replicated (4, 1, 3, 3, 3) -> (4, 3, 3, 3, 3)" in a for a in report.adapted)
    weight = target.encoder.stem.convs[0].conv.weight
    assert torch.allclose(weight, source.encoder.stem.convs[0].conv.weight.repeat(1, 3, 1, 1, 1) / 3)
    assert weight is target.encoder.stem.convs[0].all_modules[0].weight
    x = torch.randn(1, 1, 8, 8, 8)
    assert torch.allclose(source.encoder.stem(x), target.encoder.stem(x.repeat(1, 3, 1, 1, 1)), atol=1e-5)
    assert torch.equal(replicate_input_channels(torch.ones(2, 1, 3, 3, 3), 4), torch.full((2, 4, 3, 3, 3), 0.25))


def test_mismatch_lists_every_offending_key_with_shapes():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    wider = ResidualEncoderUNet(1, 4, (8, 8, 16, 16), torch.nn.Conv3d, 3, (1, 2, 2, 2), (1, 1, 1, 1), 1, (1, 1, 1),
                                conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                                nonlin=torch.nn.LeakyReLU)
    with pytest.raises(PretrainedWeightsError) as error:
        transfer_pretrained_weights(tiny_network(), wider.state_dict(), PLAN, source="wide.pth")
    message = str(error.value)
    assert "encoder.stem.convs.0.conv.weight: wide.pth (8, 1, 3, 3, 3) vs network (4, 1, 3, 3, 3)" in message
    assert "encoder.stages.0.blocks.0.conv1.conv.weight" in message


def test_a_deeper_encoder_at_the_same_widths_is_rejected_listing_every_extra_tensor():
    """n_blocks (1, 1, 2, 2) against the network's (1, 1, 1, 1): same shapes for every tensor the network has, so
    only the checkpoint side of the check can catch it."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    deeper = ResidualEncoderUNet(1, 4, (4, 8, 16, 16), torch.nn.Conv3d, 3, (1, 2, 2, 2), (1, 1, 2, 2), 1, (1, 1, 1),
                                 conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                                 nonlin=torch.nn.LeakyReLU)
    extra = sorted(k for k in canonical_state_dict(deeper.state_dict())
                   if k.startswith("encoder.") and k not in tiny_network().state_dict())
    assert extra and all(k.startswith(("encoder.stages.2.blocks.1.", "encoder.stages.3.blocks.1.")) for k in extra)
    with pytest.raises(PretrainedWeightsError) as error:
        transfer_pretrained_weights(tiny_network(), deeper.state_dict(), PLAN, source="deep.pth")
    message = str(error.value)
    assert f"({len(extra)} tensors of stem, encoder)" in message
    assert all(f"  {key}: in the deep.pth " in message for key in extra)
    assert "encoder.stages.3.blocks.1.conv1.conv.weight: in the deep.pth (16, 16, 3, 3, 3) but not in the network" \
        in message


def test_encoder_only_checkpoints_load_and_decoder_transfer_needs_a_decoder():
    source, target = tiny_network(), tiny_network()
    encoder_only = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    report = transfer_pretrained_weights(target, encoder_only, PLAN)
    assert set(report.loaded) == {"stem", "encoder"} and report.skipped == {}
    with pytest.raises(PretrainedWeightsError, match="decoder.stages.0.convs.0.conv.weight: missing"):
        transfer_pretrained_weights(target, encoder_only, PLAN, parts=("stem", "encoder", "decoder"))
