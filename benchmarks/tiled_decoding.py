"""Peak memory and time of whole-volume vs tiled VQ-GAN decoding for growing volumes.

    python benchmarks/tiled_decoding.py [--preset default] [--out tiled_decoding.json]

Each measurement runs in a fresh subprocess so its peak resident memory (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA) belongs to that decode alone; times are medians of 3
runs after a warm-up. Weights are random: memory and time do not depend on training.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(preset: str, shape: list[int], tiles: list[int] | None, device: str) -> dict:
    """Runs in the child process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bids_app.models.vqgan import PRESETS, VQGAN

    torch.manual_seed(0)
    model = VQGAN(PRESETS[preset]()).to(device).eval()
    latent = model.latent_shape(shape)
    zq = torch.randn(1, model.config.embedding_dim, *latent, device=device)
    decode = (lambda: model.decode(zq)) if tiles is None else (lambda: model.decode_tiled(zq, tiles=tuple(tiles)))
    with torch.no_grad():
        decode()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            decode()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"shape": shape, "latent": list(latent), "tiles": tiles, "median_s": statistics.median(times),
            "peak_bytes": int(peak), "device": device, "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("tiled_decoding.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return 0
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [[64, 64, 64], [64, 128, 128], [96, 128, 192]]
    rows = []
    for shape in shapes:
        for tiles in (None, [1, 1, 2], [2, 2, 2], [2, 2, 4]):
            spec = json.dumps({"preset": args.preset, "shape": shape, "tiles": tiles, "device": device})
            result = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):>12} tiles={str(tiles):>10}  {row['median_s']:.3f} s  "
                  f"{row['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    report = {"machine": platform.platform(), "torch": torch.__version__, "preset": args.preset, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
