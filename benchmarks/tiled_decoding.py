"""Peak memory and time of whole-volume vs tiled VQ-GAN decoding for growing volumes.

    python benchmarks/tiled_decoding.py [--preset tiny] [--repeats 3] [--max-latent-voxels N]
        [--device auto] [--out tiled_decoding.json]

The VQ-GAN is the one ``--preset`` trains (random weights: memory and time do not depend on
training). Each measurement runs in a fresh interpreter; its peak memory is the decode's own: on CPU
the peak increase of the resident set over its value once the model and the latent are built (torch
itself, ~300 MiB, and the weights are not counted), on CUDA ``max_memory_allocated`` (absolute, with
the increase over the model and latent next to it). The peak spans a warm-up decode and the timed
ones; times are medians of ``--repeats`` decodes after the warm-up.

Issue 10's target: with a fixed tile budget (``decode_tiled(..., max_latent_voxels=N)``), the peak
at a volume of 4x the voxels stays within 1.5x of the smaller one's. Checked on 64x128x128 against
64x256x256 (and on CUDA also 64x160x160 against the spine-generic 64x320x320), with N a quarter of
the smaller latent's voxels unless ``--max-latent-voxels`` is given; the ratio uses the decode's own
peak (the increase) on both devices.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.measurement import PeakMemory, machine_info, mib, preset_settings, resolve_device, run_child, timed  # noqa: E402

#: (smaller, 4x larger) volumes of the memory check; CUDA adds a spine-generic field of view.
CHECK_PAIRS = {"cpu": [((64, 128, 128), (64, 256, 256))],
               "cuda": [((64, 128, 128), (64, 256, 256)), ((64, 160, 160), (64, 320, 320))]}
SHAPES = [(64, 64, 64), (64, 128, 128), (64, 256, 256)]
TILES = [None, (2, 2, 2)]
TARGET_RATIO = 1.5


def build_model(preset: str, device: str):
    """The preset's VQ-GAN as the app trains it (random weights), in eval mode."""
    from bids_app.models.vqgan import VQGAN
    from bids_app.training.vqgan import vqgan_config

    torch.manual_seed(0)
    return VQGAN(vqgan_config(preset, preset_settings(preset).models.vqgan)).to(device).eval()


def measure(preset: str, shape: Sequence[int], tiles: Sequence[int] | None = None,
            max_latent_voxels: int | None = None, device: str = "cpu", repeats: int = 3,
            threads: int | None = None) -> dict[str, Any]:
    """One decode configuration (run in a fresh interpreter by ``main``): warm-up, ``repeats`` timed decodes."""
    if threads:
        torch.set_num_threads(threads)
    model = build_model(preset, device)
    latent = model.latent_shape(shape)
    zq = torch.randn(1, model.config.embedding_dim, *latent, device=device)
    if tiles is None and max_latent_voxels is None:
        def decode() -> torch.Tensor:
            return model.decode(zq)
    else:
        def decode() -> torch.Tensor:
            return model.decode_tiled(zq, tiles=tuple(tiles) if tiles else None, max_latent_voxels=max_latent_voxels)
    memory = PeakMemory(device)
    with torch.inference_mode():
        memory.start()
        decode()
        times = [timed(decode, device) for _ in range(repeats)]
        peak = memory.stop()
    halo = model.decoder.receptive_radius()
    from bids_app.models.tiling import plan_tiles

    n_tiles = len(plan_tiles(latent, tiles, max_latent_voxels, 2, halo, model.config.downsample)) \
        if (tiles or max_latent_voxels) else 1
    return {"preset": preset, "shape": list(shape), "latent": list(latent), "tiles": list(tiles) if tiles else None,
            "max_latent_voxels": max_latent_voxels, "n_tiles": n_tiles, "repeats": repeats, "times_s": times,
            "median_s": statistics.median(times) if times else float("nan"), "device": device,
            "threads": torch.get_num_threads(), "output_bytes": 4 * int(torch.tensor(shape).prod()), **peak}


def memory_checks(rows: list[dict[str, Any]], pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                  budget: int) -> list[dict[str, Any]]:
    """Peak of the 4x larger volume over the smaller one's, both tiled with the same budget."""
    checks = []
    for small, large in pairs:
        found = {tuple(r["shape"]): r for r in rows if r["max_latent_voxels"] == budget and r["tiles"] is None}
        a, b = found[tuple(small)], found[tuple(large)]
        ratio = b["peak_increase_bytes"] / max(a["peak_increase_bytes"], 1)
        checks.append({"small": list(small), "large": list(large), "max_latent_voxels": budget,
                       "small_peak_bytes": a["peak_increase_bytes"], "large_peak_bytes": b["peak_increase_bytes"],
                       "ratio": ratio, "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
                       "over_target": max(0.0, ratio / TARGET_RATIO - 1.0)})
    return checks


def specs(preset: str, device: str, budget: int | None) -> tuple[list[dict[str, Any]], int, list]:
    """The measurements of a run: shapes x (whole, tile counts), then the budgeted pairs of the check."""
    pairs = CHECK_PAIRS["cuda" if device.startswith("cuda") else "cpu"]
    if budget is None:
        model = build_model(preset, "cpu")
        budget = int(torch.tensor(model.latent_shape(pairs[0][0])).prod()) // 4
    shapes = list(dict.fromkeys([*SHAPES, *(s for pair in pairs for s in pair)]))
    out = [{"shape": list(s), "tiles": list(t) if t else None} for s in shapes for t in TILES]
    out += [{"shape": list(s), "max_latent_voxels": budget} for s in dict.fromkeys(s for p in pairs for s in p)]
    return out, budget, pairs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-latent-voxels", type=int, help="tile budget of the memory check")
    parser.add_argument("--check-only", action="store_true", help="only the budgeted pairs of the memory check")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("tiled_decoding.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return 0
    device = resolve_device(args.device)
    machine = machine_info(device)
    print(f"machine: {machine['platform']}, {machine['cpu']} ({machine['cpu_count']} cores)"
          f"{', ' + machine['gpu'] if 'gpu' in machine else ''}; torch {machine['torch']}, "
          f"{args.threads or machine['threads']} threads, device {device}; preset {args.preset}", flush=True)
    todo, budget, pairs = specs(args.preset, device, args.max_latent_voxels)
    if args.check_only:
        todo = [s for s in todo if "max_latent_voxels" in s]
    rows = []
    for spec in todo:
        spec = {"preset": args.preset, "device": device, "repeats": args.repeats, "threads": args.threads, **spec}
        row = run_child(Path(__file__), spec)
        rows.append(row)
        how = (f"budget {row['max_latent_voxels']}" if row["max_latent_voxels"] else
               "x".join(map(str, row["tiles"])) if row["tiles"] else "whole")
        print(f"{'x'.join(map(str, row['shape'])):>12} {how:>14} ({row['n_tiles']:3d} tiles)  {row['median_s']:7.3f} s  "
              f"peak +{mib(row['peak_increase_bytes']):8.1f} MiB (total {mib(row['peak_total_bytes']):8.1f}; "
              f"output {mib(row['output_bytes']):6.1f})", flush=True)
    checks = memory_checks(rows, pairs, budget)
    for check in checks:
        verdict = "met" if check["met"] else f"MISSED by {100 * check['over_target']:.0f}%"
        print(f"4x volume at a fixed tile budget ({budget} latent voxels): "
              f"{'x'.join(map(str, check['large']))} / {'x'.join(map(str, check['small']))} peak = "
              f"{check['ratio']:.2f} (target <= {TARGET_RATIO}): {verdict}", flush=True)
    report = {"machine": machine, "preset": args.preset, "repeats": args.repeats, "rows": rows, "checks": checks}
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
