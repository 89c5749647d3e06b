"""Primus MAE model: token dropping is real (encoder equals dna's EVA, costs a quarter at 75 %), nothing leaks from
masked voxels, and the Primus-M preset has the key layout nnU-Net master's fine-tuning loads."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nnssl.architectures import network_from_plans
from nnssl.finetuning.adaptation_plan import build_adaptation_plan, nnunet_architecture
from nnssl.methods.masking import BlockMaskSampler, MaskingConfig, upsample_mask
from nnssl.methods.primus_mae import PrimusMAEModel, visible_token_indices
from nnssl.presets import PRIMUS_M, PRIMUS_TINY, PrimusPreset

PATCH = PRIMUS_TINY.patch_size


def primus(preset: PrimusPreset = PRIMUS_TINY, patch=None, seed: int = 0):
    torch.manual_seed(seed)
    arch = preset.architecture(patch)
    return network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 1)


def masks(ratio: float, batch: int = 2, block: int = 8, seed: int = 0) -> torch.Tensor:
    return BlockMaskSampler(PATCH, MaskingConfig(block_size=block, ratio_range=(ratio, ratio)), seed=seed).sample(batch)


def test_visible_only_encoder_is_dnas_eva_on_the_kept_tokens():
    """With every token kept, ``encode`` is dna's Eva forward bit for bit; with a mask, each visible token's output
    depends on the visible tokens only (it equals the encoder run on that subset in another order)."""
    model = PrimusMAEModel(primus(), PATCH).eval()
    x = torch.randn(2, 1, *PATCH)
    with torch.no_grad():
        everything = visible_token_indices(torch.ones(2, 1, 8, 8, 8), model.grid)
        tokens = model.network.down_projection(x).flatten(2).transpose(1, 2)
        reference, _ = model.network.eva(tokens)
        assert torch.equal(model.encode(x, everything), reference)

        keep = visible_token_indices(masks(0.75), model.grid)
        assert keep.shape == (2, 128)  # 512 tokens, 75 % dropped
        encoded = model.encode(x, keep)
        assert encoded.shape == (2, 128, PRIMUS_TINY.embed_dim)
        reversed_keep = keep.flip(1)  # attention is permutation-equivariant given each token's own positions
        assert torch.allclose(model.encode(x, reversed_keep).flip(1), encoded, atol=1e-5)


def test_reconstruction_is_invariant_to_masked_voxels():
    """Leakage: changing masked voxels changes nothing, and their input gradient is exactly 0 (blocks of 8^3 are
    whole tokens; the encoder never sees a masked token)."""
    model = PrimusMAEModel(primus(), PATCH).eval()
    x = torch.randn(2, 1, *PATCH, requires_grad=True)
    for block in (8, 16):
        mask = masks(0.75, block=block)
        masked = 1 - upsample_mask(mask, PATCH)
        output = model(x, mask)
        perturbed = model(x.detach() + masked * 100 * torch.randn_like(x), mask)
        assert torch.equal(output, perturbed)
        x.grad = None
        output.square().sum().backward()
        assert (x.grad * masked).abs().max() == 0 and (x.grad * (1 - masked)).abs().max() > 0


def test_masked_tokens_are_reconstructed_from_the_visible_ones():
    """The token decoder is what makes MAE learn: the reconstruction at masked voxels depends on visible voxels
    (through attention), so the masked loss sends gradient to the EVA encoder."""
    model = PrimusMAEModel(primus(), PATCH)
    x = torch.randn(2, 1, *PATCH, requires_grad=True)
    mask = masks(0.75)
    masked = 1 - upsample_mask(mask, PATCH)
    (model(x, mask) * masked).square().sum().backward()
    assert (x.grad * (1 - masked)).abs().max() > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.network.eva.blocks.parameters())


def eva_flops(mask: torch.Tensor, pattern: str) -> int:
    """Forward + backward FLOPs of the encoder's modules matching ``pattern``, counted on the meta device (where
    torch's FLOP counter also sees the attention product; the CPU kernel of fused attention is not counted)."""
    cpu_keep = visible_token_indices(mask, (8, 8, 8))
    with torch.device("meta"):
        model = PrimusMAEModel(primus(), PATCH)
        x = torch.empty(mask.shape[0], 1, *PATCH)
    with FlopCounterMode(display=False) as counter:
        model(x, mask.to("meta"), cpu_keep.to("meta")).sum().backward()
    return sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if re.search(pattern, k))


def test_encoder_flops_drop_to_a_quarter_at_75_percent_masking():
    everything, masked = torch.ones(2, 1, 8, 8, 8), masks(0.75)
    linear = r"\.eva\.blocks\.\d+\.(attn\.[qkv]_proj|attn\.proj|mlp\.fc\w+)$"
    assert eva_flops(masked, linear) * 4 == eva_flops(everything, linear)  # token-wise layers: exactly a quarter
    blocks = r"\.eva\.blocks\.\d+$"
    ratio = eva_flops(masked, blocks) / eva_flops(everything, blocks)
    assert 1 / 16 < ratio < 1 / 4  # attention scales with the square of the tokens: 1/16


def test_masks_must_be_made_of_whole_tokens_and_equal_per_sample():
    grid = (8, 8, 8)
    with pytest.raises(ValueError, match="must be a multiple of the Primus patch embedding"):
        visible_token_indices(torch.ones(1, 1, 16, 16, 16), grid)  # 4^3 blocks at 64^3: finer than the tokens
    uneven = torch.ones(2, 1, 8, 8, 8)
    uneven[0, 0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="same, non-zero number of visible tokens"):
        visible_token_indices(uneven, grid)


def test_patch_not_divisible_by_the_patch_embedding_is_refused():
    with pytest.raises(ValueError, match=r"patch size \[60, 64, 64\] is not divisible by the Primus patch embedding"):
        PrimusPreset(name="bad", patch_size=(60, 64, 64), embed_dim=96, depth=2, num_heads=2, batch_size=2)
    arch = PRIMUS_TINY.architecture()
    arch["arch_kwargs"]["input_shape"] = [64, 64, 60]
    with pytest.raises(ValueError, match=r"the plans: patch size \[64, 64, 60\] is not divisible"):
        network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, 1)


def test_primus_m_preset_has_dna_primus_m_layout_and_loads_as_nnunet_master_does():
    """nnU-Net master builds a pretrained "PrimusM" with dna's ``PrimusM`` and loads ``eva.*`` and
    ``down_projection.*`` strictly into those submodules: our Primus-M (at a small patch, to fit the CPU) has the
    same keys and shapes, and the adaptation plan names it "PrimusM"."""
    from dynamic_network_architectures.architectures.primus import PrimusM

    patch = (32, 32, 32)
    ours = primus(PRIMUS_M, patch).state_dict()
    master = PrimusM(input_channels=1, output_channels=1, patch_embed_size=(8, 8, 8), input_shape=patch)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in master.state_dict().items()}
    for prefix in ("eva", "down_projection"):
        master.get_submodule(prefix).load_state_dict(
            {k[len(prefix) + 1:]: v for k, v in ours.items() if k.startswith(prefix + ".")}, strict=True)
    assert torch.equal(master.eva.pos_embed, ours["eva.pos_embed"])

    plans = {"configurations": {"3d_fullres": {"architecture": PRIMUS_M.architecture(), "patch_size": [160] * 3}}}
    plan = build_adaptation_plan(plans, "3d_fullres", 1, [160, 160, 160])
    assert plan["architecture_plans"] == {"arch_class_name": "PrimusM", "arch_kwargs": None,
                                          "arch_kwargs_requiring_import": None}
    assert (plan["key_to_encoder"], plan["key_to_stem"], plan["keys_to_in_proj"], plan["key_to_lpe"]) == \
        ("eva", "down_projection", ["down_projection.proj"], "eva.pos_embed")
    assert nnunet_architecture(plan) == PRIMUS_M.architecture()


def test_primus_mae_schedule_is_nnunets_primus_warmup_then_poly():
    """The recipe's per-epoch LR equals nnU-Net's Primus schedule (``Lin_incr_LRScheduler`` over 50 of 1000
    epochs, then ``PolyLRScheduler_offset``) at every epoch."""
    from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

    from nnssl.lr_schedule import EpochLRScheduler
    from nnssl.methods.recipe import PRIMUS_MAE_RECIPE as recipe

    def lrs(make, epochs):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.peak_lr)
        scheduler = make(optimizer)
        values = []
        for epoch in epochs:
            scheduler.step(epoch)
            values.append(optimizer.param_groups[0]["lr"])
        return values

    ours = lrs(lambda o: EpochLRScheduler(o, recipe.peak_lr, recipe.warmup_fraction, recipe.decay, 1000), range(1000))
    warmup = lrs(lambda o: Lin_incr_LRScheduler(o, recipe.peak_lr, 50), range(50))
    decay = lrs(lambda o: PolyLRScheduler_offset(o, recipe.peak_lr, 1000, 50), range(50, 1000))
    assert ours == pytest.approx(warmup + decay, rel=1e-12)
    assert (recipe.optimizer, recipe.adamw_betas, recipe.weight_decay, recipe.gradient_clip_norm) == \
        ("adamw", (0.9, 0.98), 5e-2, 1.0)
