"""Cost of one training step: S3D sparse MAE vs dense MAE vs nnU-Net's supervised step, same network/patch/batch;
and for Primus presets, the Primus MAE step (token dropping) vs nnU-Net's dense supervised Primus step.

Why: the sparse emulation (re-masking after every conv/pool, masked InstanceNorm, densification) must cost little
over the dense step, and users need steps/s and FLOP/s to estimate pretraining time on their GPU.

All three steps run the trainers' OWN code on a bare model (no dataset set-up): the S3D and MAE steps call
``nnsslPretrainTrainer.train_step`` with ``S3DPretrainTrainer.compute_loss`` (mask sampling on the device, masked
loss, backward, clipping, SGD step), the supervised step calls ``nnUNetTrainer.train_step`` with the loss from
``nnUNetTrainer._build_loss`` (DC_and_CE + deep-supervision weights) on the network that
``nnUNetTrainer.build_network_architecture`` builds from the same plans architecture (deep supervision on, 2 classes).
The optimiser is ``nnUNetTrainer.configure_optimizers`` for all three. Precision is the same for all three: bf16
autocast (nnU-Net's step inherits the dtype from an enclosing autocast) or, with ``--no-bf16`` on CUDA, fp16 autocast
with a GradScaler, which is what nnU-Net does by default; the CPU runs fp32 unless ``--bf16`` is given.

Primus (``--preset primus_tiny|primus_m64|primus_m``): the MAE step is ``nnsslPretrainTrainer.train_step`` with
``PrimusMAEPretrainTrainer``'s model (75 % of the tokens dropped before the EVA blocks) and loss; the supervised step is
nnU-Net's own ``AbstractPrimus.train_step`` (clipping at 1, no deep supervision) on the same Primus with a 2-class
head; both with the Primus MAE recipe's AdamW. FLOPs are also reported for the EVA encoder blocks alone, and
``--primus-m-flops`` counts the full Primus-M at 160^3 on the meta device (too slow to time on a CPU).

Usage: ``python benchmarks/step_cost.py --quick`` (tiny preset, 64^3, batch 2, CPU) or ``python benchmarks/step_cost.py``
(ResEnc-L, 160^3, batch 6 on CUDA; batch 1 and fewer repeats on a CPU). Needs the installed package
(``pip install --no-deps .``): the trainers and presets ship as ``nnssl.trainers`` / ``nnssl.plans``.
"""

from __future__ import annotations

import argparse
import re
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, ContextManager

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import AbstractPrimus
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _common import (TrainerHost, base_parser, peak_memory_bytes, per_round_ratios, preset_configuration,
                     print_ratio_lines, print_table, run_interleaved, summarize, timed)
from nnssl.methods.masking import BlockMaskSampler
from nnssl.methods.primus_mae import visible_token_indices
from nnssl.methods.recipe import PRIMUS_MAE_RECIPE
from nnssl.presets import PRIMUS_M, PRIMUS_TINY, RESENC_L, RESENC_TINY, PrimusPreset, ResEncPreset
from nnssl.methods.reconstruction_loss import masked_reconstruction_loss
from nnssl.trainers.finetune import nnsslFinetuneTrainer
from nnssl.trainers.pretraining import nnsslPretrainTrainer
from nnssl.trainers.primus import PrimusMAEPretrainTrainer
from nnssl.trainers.s3d import MAEPretrainTrainer, S3DPretrainTrainer

# primus_m64: Primus-M (embed 864, depth 16, 12 heads) at 64^3 (512 tokens), a size a CPU can time
PRIMUS_M64 = replace(PRIMUS_M, name="PrimusM@64", patch_size=(64, 64, 64), batch_size=1)
PRESETS = {"tiny": RESENC_TINY, "resenc_l": RESENC_L, "primus_tiny": PRIMUS_TINY, "primus_m64": PRIMUS_M64,
           "primus_m": PRIMUS_M}
# Dense bf16 tensor-core peaks in TFLOP/s, matched as substrings of torch.cuda.get_device_name (first match wins).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
SUPERVISED_CLASSES = 2  # background + one foreground label: the smallest segmentation head
CASES = ("supervised", "dense_mae", "s3d")
PRIMUS_CASES = ("primus_supervised", "primus_mae")
EVA_BLOCK = re.compile(r"\.eva\.blocks\.\d+$")  # FlopCounterMode's name of an encoder block (not the decoder's)


def cases_for(preset) -> tuple:
    """The compared steps, the baseline first."""
    return PRIMUS_CASES if isinstance(preset, PrimusPreset) else CASES


class _Host(TrainerHost):
    """A bare model plus what the trainers' step methods read (nnUNetTrainer's optimiser settings)."""

    configure_optimizers = nnUNetTrainer.configure_optimizers

    def __init__(self, device: torch.device, configuration_manager: ConfigurationManager) -> None:
        super().__init__(configuration_manager)
        self.device = device
        self.initial_lr = 1e-2
        self.weight_decay = 3e-5
        self.num_epochs = 1000
        self.is_ddp = False
        self.current_epoch = 0
        self.network: nn.Module | None = None
        self.optimizer = None
        self.grad_scaler = None


class _SupervisedHost(_Host):
    train_step = nnUNetTrainer.train_step
    _build_loss = nnUNetTrainer._build_loss
    _get_deep_supervision_scales = nnUNetTrainer._get_deep_supervision_scales
    enable_deep_supervision = True

    def __init__(self, device: torch.device, configuration_manager: ConfigurationManager, compile_: bool) -> None:
        super().__init__(device, configuration_manager)
        self.label_manager = LabelManager({"background": 0, "foreground": 1}, regions_class_order=None)
        self._compile = compile_

    def _do_i_compile(self) -> bool:
        return self._compile


class _PretrainHost(_Host):
    """nnsslPretrainTrainer's step with S3DPretrainTrainer's loss; subclasses pick the model (``wrap_network``)."""

    train_step = nnsslPretrainTrainer.train_step
    autocast = nnsslPretrainTrainer.autocast
    build_network_architecture = nnsslPretrainTrainer.build_network_architecture
    num_output_channels = nnsslPretrainTrainer.num_output_channels
    _clip_gradients = nnsslPretrainTrainer._clip_gradients
    _count_nonfinite_loss = nnsslPretrainTrainer._count_nonfinite_loss
    recipe = nnsslPretrainTrainer.recipe
    compute_loss = S3DPretrainTrainer.compute_loss
    _predict = S3DPretrainTrainer._predict
    loss_region = S3DPretrainTrainer.loss_region
    batch_loss_region = S3DPretrainTrainer.batch_loss_region
    needs_region_map = S3DPretrainTrainer.needs_region_map
    masking = S3DPretrainTrainer.masking
    restrict_loss_to_anatomy = False  # ingest without anonymisation masks: the loss reads no region map
    exclude_anonymised = False
    device_training_batch = nnsslPretrainTrainer.device_training_batch
    spatial_augmentation_on_device = False  # batches arrive at the patch size (gpu_check.py times the augmentation)

    def __init__(self, device: torch.device, configuration_manager: ConfigurationManager, use_fp16: bool) -> None:
        super().__init__(device, configuration_manager)
        self.recipe = replace(self.recipe, precision="fp16" if use_fp16 else "bf16")
        self._nonfinite_losses_this_epoch = 0
        self.mask_sampler = BlockMaskSampler(configuration_manager.patch_size, self.masking, seed=0)


class _S3DHost(_PretrainHost):
    wrap_network = S3DPretrainTrainer.wrap_network


class _DenseMAEHost(_PretrainHost):
    masking = MAEPretrainTrainer.masking
    wrap_network = MAEPretrainTrainer.wrap_network


class _PrimusMAEHost(_PretrainHost):
    """PrimusMAEPretrainTrainer's model, masks and recipe (AdamW) in the pretraining step."""

    masking = PrimusMAEPretrainTrainer.masking
    decoder = PrimusMAEPretrainTrainer.decoder
    wrap_network = PrimusMAEPretrainTrainer.wrap_network
    recipe = PRIMUS_MAE_RECIPE
    configure_optimizers = nnsslPretrainTrainer.configure_optimizers


class _PrimusSupervisedHost(_SupervisedHost):
    """nnU-Net's own dense Primus step (AbstractPrimus: clipping at 1, one output), with the same AdamW."""

    train_step = AbstractPrimus.train_step
    enable_deep_supervision = False
    recipe = PRIMUS_MAE_RECIPE
    configure_optimizers = nnsslPretrainTrainer.configure_optimizers


@dataclass
class Settings:
    preset: ResEncPreset | PrimusPreset
    batch: int
    device: torch.device
    repeats: int = 5
    warmup: int = 2
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    peak_tflops: float | None = None
    seed: int = 0


def build_host(case: str, settings: Settings, device: torch.device) -> _Host:
    """A host with its network (seeded identically for every case) built by the trainer's own method."""
    cm = preset_configuration(settings.preset, batch_size=settings.batch)
    torch.manual_seed(settings.seed)
    if case == "supervised":
        host = _SupervisedHost(device, cm, settings.compile)
        with torch.device(device):
            network = nnUNetTrainer.build_network_architecture(None, cm, 1, SUPERVISED_CLASSES, True)
    elif case == "primus_supervised":
        host = _PrimusSupervisedHost(device, cm, settings.compile)
        with torch.device(device):
            network = nnsslFinetuneTrainer.build_network_architecture(None, cm, 1, SUPERVISED_CLASSES, False)
    else:
        host_class = {"s3d": _S3DHost, "dense_mae": _DenseMAEHost, "primus_mae": _PrimusMAEHost}[case]
        host = host_class(device, cm, use_fp16=device.type == "cuda" and not settings.bf16)
        with torch.device(device):
            network = host.build_network_architecture(None, cm, 1, 1)
    host.network = network.to(device)
    if settings.channels_last:
        host.network = host.network.to(memory_format=torch.channels_last_3d)
    return host


def make_batch(case: str, host: _Host, settings: Settings) -> dict:
    """A CPU batch as the data loader delivers it (pinned on CUDA hosts), moved to the device inside the step."""
    generator = torch.Generator().manual_seed(settings.seed)
    data = torch.randn(settings.batch, 1, *settings.preset.patch_size, generator=generator)
    if settings.channels_last:
        data = data.contiguous(memory_format=torch.channels_last_3d)
    if case == "primus_supervised":
        target = torch.randint(0, SUPERVISED_CLASSES, (settings.batch, 1, *settings.preset.patch_size),
                               generator=generator, dtype=torch.int16)
    elif case == "supervised":
        shapes = [[round(p * s) for p, s in zip(settings.preset.patch_size, scale)]
                  for scale in host._get_deep_supervision_scales()]
        target = [torch.randint(0, SUPERVISED_CLASSES, (settings.batch, 1, *shape), generator=generator,
                                dtype=torch.int16) for shape in shapes]
    else:
        target = torch.ones(settings.batch, 1, *settings.preset.patch_size, dtype=torch.int16)  # ingest: all anatomy
    if settings.device.type == "cuda":
        data = data.pin_memory()
        target = [t.pin_memory() for t in target] if isinstance(target, list) else target.pin_memory()
    return {"data": data, "target": target}


def outer_autocast(settings: Settings) -> ContextManager:
    """bf16 for every step. On CUDA the pretraining trainer picks bf16 itself; nnU-Net's step opens
    ``autocast(enabled=True)`` without a dtype, which inherits bf16 from this enclosing context."""
    if settings.bf16:
        return torch.autocast(settings.device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare(case: str, settings: Settings) -> tuple[_Host, Callable[[], object]]:
    host = build_host(case, settings, settings.device)
    host.optimizer, _ = host.configure_optimizers()
    if settings.compile:
        host.network = torch.compile(host.network)
    if case in ("supervised", "primus_supervised"):
        host.loss = host._build_loss()
        if settings.device.type == "cuda" and not settings.bf16:
            host.grad_scaler = torch.amp.GradScaler("cuda")
    elif host.recipe.uses_fp16:
        host.grad_scaler = torch.amp.GradScaler("cuda")
    batch = make_batch(case, host, settings)

    def step() -> object:
        with outer_autocast(settings):
            return host.train_step(batch)

    return host, step


def count_flops(case: str, preset: ResEncPreset | PrimusPreset, batch: int) -> int:
    """Convolution/matmul FLOPs of forward + loss + backward, counted on the meta device (no compute, no memory)."""
    return flop_counter(case, preset, batch).get_total_flops()


def encoder_flops(case: str, preset: PrimusPreset, batch: int) -> int:
    """FLOPs (forward + backward) of the EVA encoder blocks alone."""
    counts = flop_counter(case, preset, batch).get_flop_counts()
    return sum(sum(ops.values()) for name, ops in counts.items() if EVA_BLOCK.search(name))


def flop_counter(case: str, preset: ResEncPreset | PrimusPreset, batch: int) -> FlopCounterMode:
    meta = torch.device("meta")
    host = build_host(case, Settings(preset, batch, meta), meta)
    x = torch.empty(batch, 1, *preset.patch_size, device=meta)
    with FlopCounterMode(display=False) as counter:
        if case == "supervised":
            loss_fn = host._build_loss()
            outputs = host.network(x)
            targets = [torch.zeros(o.shape[0], 1, *o.shape[2:], device=meta) for o in outputs]
            loss = loss_fn(outputs, targets)
        elif case == "primus_supervised":
            loss = host._build_loss()(host.network(x), torch.zeros(batch, 1, *preset.patch_size, device=meta))
        elif case == "primus_mae":
            # the visible-token indices are data dependent: computed on the CPU and handed to the model
            mask = host.mask_sampler.sample(batch, "cpu")
            keep = visible_token_indices(mask, host.network.grid).to(meta)
            loss = masked_reconstruction_loss(host.network(x, mask.to(meta), keep), x, mask.to(meta))
        else:
            mask = host.mask_sampler.sample(batch, "cpu").to(meta)
            loss = masked_reconstruction_loss(host.network(x, mask), x, mask)
        loss.backward()
    return counter


def device_peak_tflops(settings: Settings) -> float | None:
    if settings.peak_tflops is not None:
        return settings.peak_tflops
    if settings.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(settings.device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def measure(settings: Settings) -> dict[str, list[float]]:
    """Times and memory of the compared steps, printed as a table; returns the per-round headline ratios."""
    cases = cases_for(settings.preset)
    baseline = cases[0]
    steps = {}
    for case in cases:
        _, step = prepare(case, settings)
        for _ in range(settings.warmup):
            step()
        steps[case] = step
    times = run_interleaved({case: partial(timed, steps[case], settings.device) for case in cases}, settings.repeats)
    memory = {case: peak_memory_bytes(steps[case], settings.device) for case in cases}  # one extra step each
    flops = {case: count_flops(case, settings.preset, settings.batch) for case in cases}
    peak = device_peak_tflops(settings)

    rows = []
    for case in cases:
        seconds = summarize(times[case])
        vs_supervised = summarize(per_round_ratios(times[case], times[baseline]))
        achieved = flops[case] / seconds.median / 1e12
        rows.append([case, seconds.format(1e3), vs_supervised.format(),
                     f"{memory[case] / 2**20:.0f}", f"{flops[case] / settings.batch / 1e9:.1f}",
                     f"{achieved:.3g}", f"{100 * achieved / peak:.1f}" if peak else "-"])
    precision = "bf16 autocast" if settings.bf16 else ("fp16 autocast + GradScaler" if settings.device.type == "cuda"
                                                       else "fp32")
    threads = f" ({torch.get_num_threads()} threads)" if settings.device.type == "cpu" else ""
    print_table(f"Train step, {settings.preset.name} {'x'.join(map(str, settings.preset.patch_size))}, batch "
                f"{settings.batch}, {settings.device}{threads}, {precision}"
                f"{', channels-last' if settings.channels_last else ''}{', compiled' if settings.compile else ''}; "
                f"{settings.repeats} interleaved rounds, median [min..max]",
                ["step", "ms/step", "x supervised", "peak MiB", "GFLOP/sample", "TFLOP/s", "% of peak"], rows)
    print("FLOP x supervised: " + ", ".join(f"{case} {flops[case] / flops[baseline]:.3f}" for case in cases[1:])
          + (" (S3D's extra FLOPs are its densification convs; time beyond that is the sparse emulation)"
             if baseline == "supervised" else ""))
    print(f"peak MiB: tensor memory above the level before the step ("
          f"{'CUDA allocator' if settings.device.type == 'cuda' else 'torch profiler'}, one step); % of peak: of "
          f"{f'{peak:g} TFLOP/s dense bf16' if peak else 'an unknown device peak (give --peak-tflops)'}")
    if baseline == "primus_supervised":
        encoder = {case: encoder_flops(case, settings.preset, settings.batch) for case in cases}
        print(f"EVA encoder GFLOP/sample: dense {encoder[baseline] / settings.batch / 1e9:.1f}, MAE "
              f"{encoder['primus_mae'] / settings.batch / 1e9:.1f} (x{encoder['primus_mae'] / encoder[baseline]:.3f})")
        return {
            "primus_mae_step_vs_primus_supervised_step": per_round_ratios(times["primus_mae"], times[baseline]),
            "primus_mae_flops_vs_primus_supervised": [flops["primus_mae"] / flops[baseline]],
            "primus_mae_encoder_flops_vs_primus_supervised": [encoder["primus_mae"] / encoder[baseline]],
            "primus_mae_peak_memory_vs_primus_supervised": [memory["primus_mae"] / memory[baseline]],
        }
    return {
        "s3d_step_vs_supervised_step": per_round_ratios(times["s3d"], times["supervised"]),
        "s3d_step_vs_dense_mae_step": per_round_ratios(times["s3d"], times["dense_mae"]),
        "dense_mae_step_vs_supervised_step": per_round_ratios(times["dense_mae"], times["supervised"]),
        "s3d_peak_memory_vs_supervised": [memory["s3d"] / memory["supervised"]],
    }


def report_reference_flops() -> None:
    """FLOPs per 160^3 ResEnc-L sample (the number behind pretraining-time estimates), counted, not assumed."""
    rows = [[case, f"{count_flops(case, RESENC_L, 1) / 1e12:.2f}"] for case in CASES]
    print_table("FLOP count per sample, ResEnc-L 160^3, forward + backward (torch FlopCounterMode: convolutions "
                "and matmuls)", ["step", "TFLOP/sample"], rows)


def report_primus_m_flops() -> None:
    """The full Primus-M at 160^3 (8000 tokens): counted on the meta device, whole step and EVA encoder alone."""
    rows = []
    for case in PRIMUS_CASES:
        rows.append([case, f"{count_flops(case, PRIMUS_M, 1) / 1e12:.2f}",
                     f"{encoder_flops(case, PRIMUS_M, 1) / 1e12:.2f}"])
    print_table("FLOP count per sample, Primus-M 160^3, forward + backward (torch FlopCounterMode: convolutions and "
                "matmuls, attention included)", ["step", "TFLOP/sample", "EVA encoder TFLOP/sample"], rows)


def parse_settings(argv: list[str] | None = None) -> tuple[Settings, bool]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: tiny with --quick, "
                                                                                 "else resenc_l")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cpu with --quick, else cuda when available")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default on CUDA; --no-bf16 on CUDA = fp16 + GradScaler)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (and nnU-Net's dice loss)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default: 2 on CUDA "
                                                                 "for cudnn autotuning, 1 on the CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: 1 with --quick, where other processes share the cores "
                             "and competing OpenMP threads make timings erratic; else torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device's dense bf16 peak, for the "
                                                                        "efficiency column")
    parser.add_argument("--primus-m-flops", action="store_true",
                        help="after the timing, count the FLOPs of the full Primus-M at 160^3 (meta device)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    preset = PRESETS[args.preset or ("tiny" if args.quick else "resenc_l")]
    on_cpu_full = device.type == "cpu" and not args.quick
    batch = args.batch or (preset.batch_size if not on_cpu_full or preset is RESENC_TINY else 1)
    repeats = args.repeats or (5 if args.quick else (3 if on_cpu_full else 20))
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    if on_cpu_full and preset is RESENC_L:
        print(f"Note: full run on the CPU: batch {batch} (not the GPU batch {preset.batch_size}), {repeats} rounds "
              f"and {warmup} warm-up step per case, to bound time and memory (about 12 GiB per 160^3 sample in "
              f"fp32; each step takes minutes on a few cores).")
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training
    threads = args.threads or (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    settings = Settings(preset, batch, device, repeats, warmup, bf16, args.channels_last, args.compile,
                        args.peak_tflops, args.seed)
    return settings, args.primus_m_flops


def main() -> None:
    settings, primus_m_flops = parse_settings()
    ratios = measure(settings)
    if isinstance(settings.preset, PrimusPreset):
        if primus_m_flops:
            report_primus_m_flops()
    else:
        report_reference_flops()
    print_ratio_lines(ratios)


if __name__ == "__main__":
    main()
