"""S3D sparse MAE and dense MAE baseline on a tiny dna ResidualEncoderUNet, plus the masked reconstruction loss."""

import copy

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn

from nnssl.methods.mae_models import DenseMAEModel, S3DModel
from nnssl.methods.masking import BlockMaskSampler, MaskingConfig, upsample_mask
from nnssl.methods.reconstruction_loss import masked_reconstruction_loss
from nnssl.methods.sparse_encoder import masked_instance_norm

PATCH = (32, 32, 32)
NET_KWARGS = dict(
    input_channels=1, n_stages=5, features_per_stage=(4, 8, 16, 16, 16), conv_op=nn.Conv3d, kernel_sizes=3,
    strides=(1, 2, 2, 2, 2), n_blocks_per_stage=(1, 2, 2, 1, 1), num_classes=1, n_conv_per_stage_decoder=1,
    conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
    nonlin_kwargs={"inplace": True}, deep_supervision=False,
)


def make_network(seed: int = 0) -> ResidualEncoderUNet:
    """Tiny ResEnc UNet (stages at 32, 16, 8, 4, 2) with non-trivial norm affines, so a norm bias cannot hide a leak."""
    torch.manual_seed(seed)
    network = ResidualEncoderUNet(**NET_KWARGS)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return network


def make_mask(block_size: int = 8, batch: int = 2, ratio: float = 0.5, seed: int = 0) -> torch.Tensor:
    return BlockMaskSampler(PATCH, MaskingConfig(block_size, (ratio, ratio)), seed=seed).sample(batch)


def make_input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, *PATCH, generator=torch.Generator().manual_seed(seed))


def encoder_blocks(network: ResidualEncoderUNet) -> list[ConvDropoutNormReLU]:
    return [m for m in network.encoder.modules() if isinstance(m, ConvDropoutNormReLU)]


# ---------------------------------------------------------------- masked InstanceNorm


def test_masked_instance_norm_equals_instance_norm_over_visible_voxels_and_zero_elsewhere():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, 8, 8, generator=generator) * 2 + 3
    visible = (torch.rand(3, 1, 8, 8, 8, generator=generator) > 0.6).float()  # different counts per sample
    weight, bias = torch.rand(5, generator=generator) + 0.5, torch.randn(5, generator=generator)
    out = masked_instance_norm(x, visible, weight, bias, eps=1e-5)
    for b in range(3):
        keep = visible[b, 0] > 0
        gathered = x[b][:, keep]  # (C, L): the visible voxels only
        expected = F.instance_norm(gathered[None], weight=weight, bias=bias, eps=1e-5)[0]
        torch.testing.assert_close(out[b][:, keep], expected, rtol=1e-5, atol=1e-5)
        assert (out[b][:, ~keep] == 0).all()


def test_masked_instance_norm_keeps_low_precision_dtype():
    x = torch.randn(2, 3, 4, 4, 4).bfloat16()
    assert masked_instance_norm(x, torch.ones(2, 1, 4, 4, 4)).dtype == torch.bfloat16


# ---------------------------------------------------------------- sparse encoder


def test_encoder_with_all_ones_mask_equals_plain_dna_encoder():
    network = make_network()
    plain = copy.deepcopy(network)
    model = S3DModel(network)
    x = make_input()
    with torch.no_grad():
        sparse_features = model.encode(x, torch.ones(2, 1, 4, 4, 4))
        dense_features = plain.encoder(x)
    assert len(sparse_features) == len(dense_features) == 5
    for sparse, dense in zip(sparse_features, dense_features):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def test_every_encoder_conv_and_pool_output_is_remasked_once():
    model = S3DModel(make_network())
    ops = [m for m in model.network.encoder.modules() if isinstance(m, (nn.Conv3d, nn.AvgPool3d))]
    outputs = []
    for op in ops:  # registered after the model's own hooks, so they see the re-masked output
        op.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    mask = make_mask(block_size=8)
    with torch.no_grad():
        model(make_input(), mask)
    # stem + two convs in each of the 7 blocks + a pool per down-step (4) + a 1x1 conv where channels change (2)
    assert len(outputs) == len(ops) == 1 + 2 * 7 + 4 + 2
    for output in outputs:
        assert (output * (1 - upsample_mask(mask, output.shape[2:])) == 0).all()
    assert any((upsample_mask(mask, o.shape[2:]) == 0).any() for o in outputs)  # masked positions were present


@pytest.mark.parametrize("block_size", [8, 16])  # 8: bottleneck coarser than the grid (reference); 16: aligned
def test_no_leakage_from_masked_input_voxels(block_size):
    model = S3DModel(make_network())
    mask = make_mask(block_size)
    x = make_input()
    masked_region = upsample_mask(mask, PATCH) == 0
    x_changed = torch.where(masked_region, torch.randn_like(x) * 10 + 5, x)
    x_visible_changed = torch.where(masked_region, x, x + 1)
    with torch.no_grad():
        features, features_changed = model.encode(x, mask), model.encode(x_changed, mask)
        prediction, prediction_changed = model(x, mask), model(x_changed, mask)
        prediction_visible_changed = model(x_visible_changed, mask)
    for stage, (feature, changed) in enumerate(zip(features, features_changed)):
        assert torch.equal(feature, changed), f"stage {stage} sees masked input voxels"
        stage_visible = upsample_mask(mask, feature.shape[2:])
        assert (feature * (1 - stage_visible) == 0).all(), f"stage {stage} is not zero at masked positions"
    assert torch.equal(prediction, prediction_changed)
    assert not torch.allclose(prediction, prediction_visible_changed)  # the test is not vacuous
    loss = masked_reconstruction_loss(prediction, x_changed, mask)
    assert loss.item() != masked_reconstruction_loss(prediction, x, mask).item()  # the target is the real patch


def test_forward_shape_and_gradients_reach_tokens_densify_convs_and_network():
    network = make_network()
    model = S3DModel(network)
    mask = make_mask(block_size=8)  # grid 4^3: stages at 32, 16, 8, 4 are masked; the 2^3 bottleneck is not
    x = make_input()
    prediction = model(x, mask)
    assert prediction.shape == (2, 1, *PATCH)
    masked_reconstruction_loss(prediction, x, mask).backward()
    for stage, token in enumerate(model.mask_tokens[:-1]):
        assert token.grad is not None and token.grad.abs().sum() > 0, f"mask token {stage} gets no gradient"
    assert model.mask_tokens[-1].grad is not None and (model.mask_tokens[-1].grad == 0).all()
    assert isinstance(model.densify_convs[0], nn.Identity)
    for conv in model.densify_convs[1:]:
        assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0
    # Only dna's deep-supervision heads (unused with deep_supervision=False) stay without gradient; the bottleneck
    # token gets a zero gradient instead of None.
    missing = {name for name, p in model.named_parameters() if p.grad is None}
    n_heads = NET_KWARGS["n_stages"] - 1
    assert missing == {f"network.decoder.seg_layers.{i}.{p}" for i in range(n_heads - 1) for p in ("weight", "bias")}


def test_mask_tokens_and_densify_convs_have_the_documented_shapes_and_init():
    model = S3DModel(make_network(), mask_token_std=0.02)
    channels = NET_KWARGS["features_per_stage"]
    assert [tuple(t.shape) for t in model.mask_tokens] == [(1, c, 1, 1, 1) for c in channels]
    assert all(t.abs().max() <= 0.02 for t in model.mask_tokens)
    for conv, c in zip(model.densify_convs[1:], channels[1:]):
        assert conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1)
        assert (conv.in_channels, conv.out_channels) == (c, c) and conv.bias is not None


# ---------------------------------------------------------------- state_dict, aliases, weight transfer


def test_network_state_dict_and_aliases_survive_wrapping_and_training():
    network = make_network()
    original_norm_weights = [block.norm.weight for block in encoder_blocks(network)]
    model = S3DModel(network)
    fresh = ResidualEncoderUNet(**NET_KWARGS)
    assert list(model.network.state_dict().keys()) == list(fresh.state_dict().keys())
    assert [block.norm.weight for block in encoder_blocks(network)] == original_norm_weights
    assert all(a is b for a, b in zip([blk.norm.weight for blk in encoder_blocks(network)], original_norm_weights))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask, x = make_mask(), make_input()
    stem_before = network.encoder.stem.convs[0].conv.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        masked_reconstruction_loss(model(x, mask), x, mask).backward()
        optimizer.step()
    assert not torch.equal(stem_before, network.encoder.stem.convs[0].conv.weight)  # it trained
    for block in encoder_blocks(network):
        assert block.conv is block.all_modules[0] and block.conv.weight is block.all_modules[0].weight
        assert block.norm is block.all_modules[1] and block.norm.weight is block.all_modules[1].weight
        assert isinstance(block.norm, nn.InstanceNorm3d)
    state = model.network.state_dict()
    stem = "encoder.stem.convs.0"
    assert state[f"{stem}.conv.weight"].data_ptr() == state[f"{stem}.all_modules.0.weight"].data_ptr()

    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.network(x), rtol=0, atol=0)  # outside S3D forward: plain dense net


def test_deep_supervision_is_rejected():
    network = ResidualEncoderUNet(**{**NET_KWARGS, "deep_supervision": True})
    with pytest.raises(ValueError, match="deep_supervision"):
        S3DModel(network)
    with pytest.raises(ValueError, match="deep_supervision"):
        DenseMAEModel(network)


def test_wrapping_the_same_network_twice_is_rejected():
    network = make_network()
    S3DModel(network)
    with pytest.raises(ValueError, match="already sparsified"):
        S3DModel(network)


# ---------------------------------------------------------------- dense MAE baseline


def test_dense_mae_output_depends_only_on_visible_voxels():
    network = make_network()
    model = DenseMAEModel(network)
    mask, x = make_mask(), make_input()
    masked_region = upsample_mask(mask, PATCH) == 0
    with torch.no_grad():
        prediction = model(x, mask)
        prediction_changed = model(torch.where(masked_region, x * 7 - 3, x), mask)
        prediction_visible_changed = model(torch.where(masked_region, x, x + 1), mask)
    assert prediction.shape == (2, 1, *PATCH)
    assert torch.equal(prediction, prediction_changed)
    assert not torch.allclose(prediction, prediction_visible_changed)
    assert list(model.network.state_dict().keys()) == list(ResidualEncoderUNet(**NET_KWARGS).state_dict().keys())


# ---------------------------------------------------------------- masked reconstruction loss


def loss_fixture():
    """Batch of 2, 4^3 voxels, 2^3 grid (2-voxel blocks); sample 0 has 3 masked cells, sample 1 has 1."""
    mask = torch.ones(2, 1, 2, 2, 2)
    mask[0, 0, 0, 0, 0] = mask[0, 0, 1, 1, 1] = mask[0, 0, 0, 1, 0] = 0
    mask[1, 0, 1, 0, 1] = 0
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 1, 4, 4, 4, generator=generator)
    target = torch.randn(2, 1, 4, 4, 4, generator=generator)
    return prediction, target, mask


def test_loss_is_pooled_mean_over_masked_voxels_only():
    prediction, target, mask = loss_fixture()
    masked = upsample_mask(mask, (4, 4, 4)) == 0
    squared = (prediction - target) ** 2
    expected = squared[masked].mean()  # pooled: 24 + 8 voxels, one mean
    loss = masked_reconstruction_loss(prediction, target, mask)
    torch.testing.assert_close(loss, expected)
    per_sample_mean = torch.stack([squared[b][masked[b]].mean() for b in range(2)]).mean()
    assert not torch.isclose(loss, per_sample_mean)

    noisy = torch.where(masked, prediction, prediction + 100)  # error on visible voxels only
    torch.testing.assert_close(masked_reconstruction_loss(noisy, target, mask), loss)


def test_loss_region_restricts_further_and_empty_selection_gives_zero_with_grad():
    prediction, target, mask = loss_fixture()
    prediction.requires_grad_(True)
    region = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    region[..., :2] = True
    scored = (upsample_mask(mask, (4, 4, 4)) == 0) & region
    expected = ((prediction - target) ** 2)[scored].mean()
    torch.testing.assert_close(masked_reconstruction_loss(prediction, target, mask, region), expected)

    empty = masked_reconstruction_loss(prediction, target, torch.ones_like(mask))
    assert empty.item() == 0 and empty.grad_fn is not None
    empty.backward()
    assert (prediction.grad == 0).all()


def test_loss_is_float32_for_low_precision_predictions():
    prediction, target, mask = loss_fixture()
    loss = masked_reconstruction_loss(prediction.bfloat16(), target, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, masked_reconstruction_loss(prediction.bfloat16().float(), target, mask))


def test_masked_instance_norm_backward_passes_gradcheck():
    """The hand-written backward of the masked InstanceNorm against finite differences (float64)."""
    from nnssl.methods.sparse_encoder import masked_instance_norm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    visible = (torch.rand(2, 1, 4, 4, 4, generator=generator) > 0.4).double()
    weight = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: masked_instance_norm(a, visible, w, b, 1e-5), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a: masked_instance_norm(a, visible, None, None, 1e-5), (x,))
