"""Training step time, throughput, FLOPs and peak memory of each training stage.

    python benchmarks/training_step.py [--preset tiny default] [--stage vqgan vqgan_adv diffusion adapter]
        [--reference-codes 2048 16384] [--shape X Y Z] [--batch [PRESET=]N ...] [--repeats 5] [--min-time 20]
        [--activation-checkpointing preset|on|off] [--device auto] [--out training_step.json]

Stages (``train_step`` of the app's own stage classes, on the preset's settings and architectures):
``vqgan`` (VQ-GAN before ``disc_start``: reconstruction + commitment), ``vqgan_adv`` (after it: with the
2D and 3D discriminators, their loss and feature matching), ``diffusion`` (the frozen VQ-GAN encodes,
the UNet trains) and ``adapter`` (frozen VQ-GAN and UNet, the T2I-Adapter trains). Shapes: each
preset's ``preprocessing.max_shape`` (the plan's volume for any data with a field of view at least
that large: tiny 32^3, default 64x64x128) and its batch size, or ``--shape``/``--batch``. The reference point of issue
10 (``--reference-codes``): a VQ-GAN step with discriminators on one 32x128x128 volume, default
architecture, at each codebook size.

Each configuration runs in a fresh interpreter. Its first step is the warm-up and its FLOPs are
counted by ``torch.utils.flop_counter``'s formulas, those of ``FlopCounterMode`` (forward and backward
of convolutions, matmuls and attention; elementwise work is not counted; a checkpointed block's
recomputation is counted; see :func:`count_flops` for why not the mode itself); then
timed steps, up to ``--repeats`` of them or until they took ``--min-time`` seconds (median reported;
at least one), unless the warm-up alone took ``--long-step`` seconds: a default-preset VQ-GAN step
takes minutes on 2 CPU cores, and its warm-up step is then the measurement (``time_source``).
Achieved FLOP/s is set against the machine's dense matmul rate measured at the start of the same
run (``torch.mm`` of 2048^2 fp32 on CPU; on CUDA in the dtype the stage computes in). Peak memory
is over all steps, from just before the first one (so it includes the optimiser state the first
step creates): CUDA ``max_memory_allocated``, CPU the peak increase of the resident set (see
``benchmarks/measurement.py``). Data are random volumes held in memory: the step time excludes
reading and augmenting the data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.measurement import (  # noqa: E402
    PeakMemory,
    machine_info,
    matmul_rate,
    mib,
    preset_settings,
    resolve_device,
    run_child,
    timed,
)

STAGES = ("vqgan", "vqgan_adv", "diffusion", "adapter")
PRESET_NAMES = ("tiny", "default")
REFERENCE_SHAPE = (32, 128, 128)
#: The memory target of issue 10 for the reference step, at any codebook size.
REFERENCE_TARGET_BYTES = 4 * 2**30
NEVER = 10**9  # a disc_start no step reaches


class SyntheticVolumes:
    """In-memory stand-in for ``TrainingVolumes``: random images in [-1, 1] and a random control mask."""

    def __init__(self, n: int, shape: Sequence[int], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = [torch.rand(1, *shape, generator=generator) * 2 - 1 for _ in range(n)]
        self.controls = [torch.rand(1, *shape, generator=generator) > 0.9 for _ in range(n)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        return {"image": image, "valid": torch.ones_like(image, dtype=torch.bool), "control": self.controls[index]}


def preset_shape(preset: str) -> tuple[int, int, int]:
    """The largest volume the preset's plan produces: ``max_shape`` rounded down to ``shape_multiple``."""
    prep = preset_settings(preset).preprocessing
    multiple = prep.shape_multiple
    return tuple(max(multiple, s // multiple * multiple) for s in prep.max_shape)  # type: ignore[return-value]


def build_stage(kind: str, preset: str, shape: Sequence[int], batch: int, device: str,
                n_codes: int | None = None, checkpointing: bool | None = None, seed: int = 0) -> Any:
    """The app's stage object for ``kind``, configured as ``--preset`` configures it, on random data;
    ``checkpointing`` overrides the VQ-GAN stage's ``activation_checkpointing``."""
    from bids_app.models.adapter import AdapterConfig
    from bids_app.models.discriminators import DiscriminatorConfig
    from bids_app.models.unet3d import UNet3D
    from bids_app.models.vqgan import VQGAN
    from bids_app.schedulers import SchedulerConfig
    from bids_app.training.adapter import AdapterStage
    from bids_app.training.loop import StageContext
    from bids_app.training.diffusion import DiffusionStage, unet_config
    from bids_app.training.vqgan import VQGANStage, vqgan_config

    if kind not in STAGES:
        raise ValueError(f"unknown stage {kind!r}; choose from {', '.join(STAGES)}")
    settings = preset_settings(preset)
    models = settings.models
    vq_overrides = {**models.vqgan, **({"n_codes": n_codes} if n_codes else {})}
    vq_cfg = vqgan_config(preset, vq_overrides)
    data = SyntheticVolumes(max(batch, 2), shape, seed)
    if kind in ("vqgan", "vqgan_adv"):
        stage_settings = dataclasses.replace(settings.training.vqgan, batch_size=batch, accumulation_steps=1,
                                             disc_start=0 if kind == "vqgan_adv" else NEVER, figure_every=0)
        if checkpointing is not None:
            stage_settings = dataclasses.replace(stage_settings, activation_checkpointing=checkpointing)
        disc_cfg = DiscriminatorConfig.from_dict(dict(models.discriminator))
        return VQGANStage(vq_cfg, disc_cfg, stage_settings, data, data, StageContext(device, seed))
    torch.manual_seed(seed)
    vqgan = VQGAN(vq_cfg)
    unet_cfg = unet_config(preset, vq_cfg.embedding_dim, models.unet)
    scheduler_cfg = SchedulerConfig.from_dict(dict(models.scheduler))
    if kind == "diffusion":
        stage_settings = dataclasses.replace(settings.training.diffusion, batch_size=batch, accumulation_steps=1,
                                             figure_every=0)
        return DiffusionStage(vqgan, unet_cfg, scheduler_cfg, stage_settings, data, 1.0, StageContext(device, seed))
    stage_settings = dataclasses.replace(settings.training.adapter, batch_size=batch, accumulation_steps=1,
                                         figure_every=0)
    adapter_cfg = AdapterConfig.for_models(unet_cfg, vq_cfg.downsample, **dict(models.adapter))
    return AdapterStage(vqgan, UNet3D(unet_cfg), scheduler_cfg, adapter_cfg, stage_settings, data, 1.0,
                        StageContext(device, seed))


class _FlopCount(TorchDispatchMode):
    """FlopCounterMode's count without its module tracker (see :func:`count_flops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(function) -> int:
    """FLOPs of one call, by ``torch.utils.flop_counter``'s formulas (``FlopCounterMode``'s registry:
    matmuls, convolutions and their backward, attention; elementwise work is not counted).

    Why not ``FlopCounterMode`` itself: its module tracker hooks the inputs and outputs of every module
    for the backward, and in a checkpointed VQ-GAN step that kept activations alive (the first step's
    resident peak grew by ~50% at 16x64x64), which the peak memory measured over the same step would
    then report. The total equals ``FlopCounterMode(display=False).get_total_flops()`` (tested).
    """
    counter = _FlopCount()
    with counter:
        function()
    return counter.flops


def compute_dtype(device: str, preset: str, kind: str) -> str:
    """The dtype the stage's forward runs in (autocast on CUDA per ``precision``; fp32 on CPU)."""
    from bids_app.training import loop

    stage = "vqgan" if kind.startswith("vqgan") else kind
    dtype = loop.amp_dtype(device, getattr(preset_settings(preset).training, stage).precision)
    return str(dtype or torch.float32).replace("torch.", "")


def measure_step(stage: str, preset: str, shape: Sequence[int], batch: int, device: str = "cpu", repeats: int = 5,
                 min_time: float = 0.0, long_step: float = float("inf"), n_codes: int | None = None,
                 checkpointing: bool | None = None, threads: int | None = None, label: str = "") -> dict[str, Any]:
    """Build the stage, run one FLOP-counted warm-up step, then timed steps until ``repeats`` of them or
    ``min_time`` seconds of them (at least one); peak memory over all steps.

    A warm-up step that took ``long_step`` seconds or more is the only one: its time is reported
    (``time_source: "warm-up"``). What a warm-up absorbs (allocations, kernel selection, the codebook's
    initialisation) is a fraction of a second, negligible against such a step; compare ``warmup_s``
    with ``times_s`` on the shorter rows.
    """
    if threads:
        torch.set_num_threads(threads)
    built = build_stage(stage, preset, shape, batch, device, n_codes, checkpointing)
    memory = PeakMemory(device)
    memory.start()
    flops: list[int] = []
    warmup = timed(lambda: flops.append(count_flops(lambda: built.train_step(0))), device)
    times: list[float] = []
    if warmup < long_step:
        while len(times) < max(repeats, 1) and not (times and sum(times) >= min_time):
            times.append(timed(lambda: built.train_step(len(times) + 1), device))
    peak = memory.stop()
    median = statistics.median(times) if times else warmup
    config = getattr(built, "config", None)
    vq_config = config if stage.startswith("vqgan") else built.vqgan.config
    return {
        "label": label or stage, "stage": stage, "preset": preset, "shape": list(shape), "batch": batch,
        "n_codes": vq_config.n_codes, "checkpointing": bool(built.model.encoder.checkpointing)
        if stage.startswith("vqgan") else None, "device": device, "threads": torch.get_num_threads(),
        "dtype": compute_dtype(device, preset, stage), "repeats": len(times), "warmup_s": warmup, "times_s": times,
        "time_source": "median of timed steps" if times else "warm-up", "median_s": median,
        "volumes_per_s": batch / median, "flops": flops[0], "flop_per_s": flops[0] / median,
        "parameters": sum(p.numel() for p in _trained_module(built).parameters()), **peak,
    }


def _trained_module(stage: Any) -> torch.nn.Module:
    return stage.adapter if hasattr(stage, "adapter") else stage.model


def configurations(presets: Sequence[str], stages: Sequence[str], reference_codes: Sequence[int],
                   shape: Sequence[int] | None = None, batch: int | dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The measurement specs a run makes, in order: presets x stages, then the reference steps.
    ``batch``: one for every preset, or per preset name (others keep the preset's)."""
    specs = []
    for preset in presets:
        settings = preset_settings(preset).training
        wanted = batch.get(preset) if isinstance(batch, dict) else batch
        for stage in stages:
            stage_batch = wanted or getattr(settings, "vqgan" if stage.startswith("vqgan") else stage).batch_size
            specs.append({"stage": stage, "preset": preset, "shape": list(shape or preset_shape(preset)),
                          "batch": stage_batch, "label": f"{preset} {stage}"})
    for codes in reference_codes:
        specs.append({"stage": "vqgan_adv", "preset": "default", "shape": list(REFERENCE_SHAPE), "batch": 1,
                      "n_codes": codes, "label": f"reference vqgan_adv {codes} codes"})
    return specs


def parse_batch(values: Sequence[str]) -> int | dict[str, int] | None:
    """``["1"]`` -> 1; ``["default=1", "tiny=4"]`` -> per preset; ``[]`` -> None (the presets' own)."""
    per_preset: dict[str, int] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        if not name:
            return int(number)
        if name not in PRESET_NAMES:
            raise SystemExit(f"--batch {value}: unknown preset {name!r}")
        per_preset[name] = int(number)
    return per_preset or None


def summarise(rows: list[dict[str, Any]], rates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the fraction of the matmul rate (of the row's dtype) and the reference's memory verdict."""
    for row in rows:
        rate = rates.get(row["dtype"], rates["float32"])["flop_per_s"]
        row["matmul_fraction"] = row["flop_per_s"] / rate
        if row["label"].startswith("reference"):
            row["memory_target_bytes"] = REFERENCE_TARGET_BYTES
            row["memory_target_met"] = row["peak_total_bytes"] <= REFERENCE_TARGET_BYTES
    return rows


def format_row(row: dict[str, Any]) -> str:
    shape = "x".join(map(str, row["shape"]))
    return (f"{row['label']:<34} {shape:>11} b={row['batch']} {row['median_s']:8.3f} s {row['volumes_per_s']:8.3f} vol/s "
            f"{row['flops'] / 1e9:9.1f} GFLOP {row['flop_per_s'] / 1e9:7.1f} GFLOP/s ({100 * row['matmul_fraction']:4.1f}%) "
            f"peak +{mib(row['peak_bytes']):7.0f} MiB (total {mib(row['peak_total_bytes']):7.0f})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="*", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    parser.add_argument("--stage", nargs="*", default=list(STAGES), choices=STAGES)
    parser.add_argument("--reference-codes", nargs="*", type=int, default=[2048, 16384],
                        help="codebook sizes of the 32x128x128 reference step (none: skip it)")
    parser.add_argument("--shape", nargs=3, type=int, help="volume shape for every preset (default: the preset's)")
    parser.add_argument("--batch", nargs="*", default=[], metavar="[PRESET=]N",
                        help="batch for every stage of every preset (N) or of one preset (default=1); "
                             "default: the preset's")
    parser.add_argument("--repeats", type=int, default=5, help="at most this many timed steps after the warm-up")
    parser.add_argument("--min-time", type=float, default=20.0,
                        help="stop timing once the timed steps took this long (seconds; at least one step)")
    parser.add_argument("--long-step", type=float, default=30.0,
                        help="a warm-up step this long (seconds) is the only step, and its time is reported")
    parser.add_argument("--activation-checkpointing", choices=("preset", "on", "off"), default="preset",
                        help="the VQ-GAN stage's activation_checkpointing (default: as the app runs it)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--matmul-size", type=int, help="matmul side for the machine's rate (2048 CPU, 8192 CUDA)")
    parser.add_argument("--out", type=Path, default=Path("training_step.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_step(**json.loads(args.child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    specs = configurations(args.preset, args.stage, args.reference_codes, args.shape, parse_batch(args.batch))
    machine = machine_info(device)
    print(f"machine: {machine['platform']}, {machine['cpu']} ({machine['cpu_count']} cores)"
          f"{', ' + machine['gpu'] if 'gpu' in machine else ''}; torch {machine['torch']}, "
          f"{machine['threads']} threads, device {device}", flush=True)
    size = args.matmul_size or (8192 if device.startswith("cuda") else 2048)
    rates = {"float32": matmul_rate(device, size)}
    if device.startswith("cuda"):
        for dtype in {compute_dtype(device, s["preset"], s["stage"]) for s in specs} - {"float32"}:
            rates[dtype] = matmul_rate(device, size, dtype=getattr(torch, dtype))
    for dtype, rate in rates.items():
        print(f"dense matmul {size}^2 {dtype}: {rate['flop_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    report = {"machine": machine, "matmul": rates, "repeats": args.repeats, "min_time_s": args.min_time,
              "long_step_s": args.long_step, "rows": rows}
    for spec in specs:
        spec = {**spec, "device": device, "repeats": args.repeats, "min_time": args.min_time, "long_step": args.long_step,
                "threads": args.threads,
                "checkpointing": {"preset": None, "on": True, "off": False}[args.activation_checkpointing]}
        print(f"{spec['label']}: {'x'.join(map(str, spec['shape']))}, batch {spec['batch']} ...", flush=True)
        row = summarise([run_child(Path(__file__), spec)], rates)[0]
        rows.append(row)
        print("  " + format_row(row), flush=True)
        args.out.write_text(json.dumps(report, indent=2))  # after every row: a long run keeps what it measured
    for row in rows:
        if "memory_target_met" in row:
            verdict = "met" if row["memory_target_met"] else "MISSED"
            print(f"memory target (<= {mib(REFERENCE_TARGET_BYTES):.0f} MiB) {verdict}: {row['label']} peak "
                  f"{mib(row['peak_total_bytes']):.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
