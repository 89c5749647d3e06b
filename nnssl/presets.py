"""The fixed network presets of nnssl: ResEnc-L exactly as in the S3D paper, Primus-M as nnU-Net's Primus trainer
builds it, and tiny CPU presets of both families.

The presets are independent of any dataset: pretraining and every downstream dataset planned with the same preset
get the identical architecture, so encoder weights transfer 1:1.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from nnssl.errors import InvalidValueError

RESENC_UNET_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"


@dataclass(frozen=True)
class ResEncPreset:
    """A ResEnc U-Net topology plus the patch and batch it is trained with (always at 1x1x1 mm)."""

    name: str
    patch_size: Tuple[int, int, int]
    features_per_stage: Tuple[int, ...]
    n_blocks_per_stage: Tuple[int, ...]
    batch_size: int
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def strides(self) -> Tuple[Tuple[int, int, int], ...]:
        return ((1, 1, 1),) + ((2, 2, 2),) * (self.n_stages - 1)

    def architecture(self) -> dict:
        """The ``architecture`` block of an nnU-Net plans configuration."""
        return {
            "network_class_name": RESENC_UNET_CLASS,
            "arch_kwargs": {
                "n_stages": self.n_stages,
                "features_per_stage": list(self.features_per_stage),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * self.n_stages,
                "strides": [list(s) for s in self.strides],
                "n_blocks_per_stage": list(self.n_blocks_per_stage),
                "n_conv_per_stage_decoder": [1] * (self.n_stages - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }


RESENC_L = ResEncPreset(
    name="ResEncL",
    patch_size=(160, 160, 160),
    features_per_stage=(32, 64, 128, 256, 320, 320),
    n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
    batch_size=6,
)

RESENC_TINY = ResEncPreset(
    name="ResEncTiny",
    patch_size=(64, 64, 64),
    features_per_stage=(8, 16, 32, 64, 64),
    n_blocks_per_stage=(1, 1, 2, 2, 2),
    batch_size=2,
)

# The transfer probe's CPU preset: the tiny network at 1.5 mm with a 48^3 patch (a 72 mm field of view, the demo
# heads' size); one training step costs about a third of the tiny preset's 64^3 step on 2 CPU cores.
RESENC_MINI = ResEncPreset(
    name="ResEncMini",
    patch_size=(48, 48, 48),
    features_per_stage=RESENC_TINY.features_per_stage,
    n_blocks_per_stage=RESENC_TINY.n_blocks_per_stage,
    batch_size=2,
    spacing=(1.5, 1.5, 1.5),
)


@dataclass(frozen=True)
class PrimusPreset:
    """A Primus (patch embedding + EVA transformer + patch decoder) and the patch and batch it is trained with.

    ``drop_path_rate``, ``scale_attn_inner`` and ``init_values`` are those of nnU-Net's ``nnUNet_Primus_M_Trainer``;
    the last two decide the state-dict layout (attention norms, layer-scale ``gamma`` tensors), which therefore equals
    dna's ``PrimusM`` that nnU-Net's master branch builds for a pretrained "PrimusM".
    """

    name: str
    patch_size: Tuple[int, int, int]
    embed_dim: int
    depth: int
    num_heads: int
    batch_size: int
    patch_embed_size: Tuple[int, int, int] = (8, 8, 8)
    drop_path_rate: float = 0.2
    scale_attn_inner: bool = True
    init_values: float = 0.1
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        check_patch_embedding(self.patch_size, self.patch_embed_size, f"preset {self.name}")

    def architecture(self, patch_size: Optional[Tuple[int, ...]] = None) -> dict:
        """The ``architecture`` block of an nnU-Net plans configuration (``input_shape`` = the training patch)."""
        input_shape = [int(p) for p in (patch_size or self.patch_size)]
        check_patch_embedding(input_shape, self.patch_embed_size, f"preset {self.name}")
        return {
            "network_class_name": PRIMUS_CLASS,
            "arch_kwargs": {
                "embed_dim": self.embed_dim,
                "patch_embed_size": list(self.patch_embed_size),
                "eva_depth": self.depth,
                "eva_numheads": self.num_heads,
                "input_shape": input_shape,
                "drop_path_rate": self.drop_path_rate,
                "scale_attn_inner": self.scale_attn_inner,
                "init_values": self.init_values,
            },
            "_kw_requires_import": [],
        }


def check_patch_embedding(patch_size, patch_embed_size, source: str) -> None:
    """A Primus tokenises the patch into ``patch_embed_size`` cubes: every axis must be a multiple (dna only asserts)."""
    if len(patch_size) != 3 or any(int(p) % int(e) for p, e in zip(patch_size, patch_embed_size)):
        raise InvalidValueError(f"{source}: patch size {list(patch_size)} is not divisible by the Primus patch "
                                f"embedding {list(patch_embed_size)} on every axis; choose a patch size that is a "
                                f"multiple of it.")


PRIMUS_M = PrimusPreset(name="PrimusM", patch_size=(160, 160, 160), embed_dim=864, depth=16, num_heads=12,
                        batch_size=8)

# CPU preset of the same family: 8^3 tokens at 64^3, embed 96 with 2 heads of width 48 (EVA's 3D rotary embedding
# needs head widths that are multiples of 6; the MAE decoder's single head keeps the width), 2 blocks
PRIMUS_TINY = PrimusPreset(name="PrimusTiny", patch_size=(64, 64, 64), embed_dim=96, depth=2, num_heads=2,
                           batch_size=2)
