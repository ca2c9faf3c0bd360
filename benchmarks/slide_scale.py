"""Whole-slide scale: generated pyramidal OME-TIFF slides, mostly glass with the same tissue islands,
at growing sizes, run end to end with `seamline run` on a one-worker LocalCluster.

Prints, per slide: side, tiles in the grid, tiles read (tissue), time, peak RSS of the worker
process and of the client process. Runtime should follow tissue area, not slide area, and the
worker's peak memory should stay flat (target < 2 GB per worker).

    python benchmarks/slide_scale.py                     # 25k², 50k², 100k² slides, 6 islands of 1024²
    python benchmarks/slide_scale.py --sides 100000 150000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine, run_measured
from pipeline.synthetic_slide import make_islands, write_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--islands", type=int, default=6)
    parser.add_argument("--island-size", type=int, default=1024)
    parser.add_argument("--model", default="synthetic-shapes")
    parser.add_argument("--workdir", type=Path, default=None, help="Where slides and outputs go (default: a temp dir).")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="seamline-slides-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    rows = []
    for side in args.sides:
        slide = workdir / f"slide-{side}.ome.tif"
        start = time.perf_counter()
        if not slide.is_file():  # slides are deterministic: a --workdir of an earlier run is reused
            write_slide(slide, side, side, make_islands(side, side, args.islands, args.island_size, seed=11), mpp=0.25)
        written = time.perf_counter() - start
        out = workdir / f"out-{side}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "workflows.cli", "run", str(slide), "--model", args.model, "--out", str(out),
                   "--workers", "1", "--threads", "2", "--no-progress"]
        measured = run_measured(command, want_json=False)
        seconds, peaks = measured["seconds"], measured["roles"]
        summary = json.loads((out / f"slide-{side}" / "counts.json").read_text())
        rows.append({
            "side": side, "file_mb": slide.stat().st_size / 2**20, "write_s": written, "tiles": summary.get("tiles"),
            "tiles_read": (summary.get("tiles", 0) - summary.get("tiles_background", 0)) if summary else None,
            "instances": summary.get("instances"), "run_s": seconds,
            "worker_peak_mb": peaks.get("worker", 0) / 2**20, "client_peak_mb": peaks.get("client", 0) / 2**20,
        })
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'side':>8} {'file MB':>8} {'tiles':>7} {'read':>5} {'objects':>8} {'run s':>7} {'worker MB':>10} {'client MB':>10}")
    for r in rows:
        print(f"{r['side']:>8} {r['file_mb']:>8.1f} {r['tiles']!s:>7} {r['tiles_read']!s:>5} {r['instances']!s:>8} "
              f"{r['run_s']:>7.1f} {r['worker_peak_mb']:>10.0f} {r['client_peak_mb']:>10.0f}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"\narea ×{(last['side'] / first['side']) ** 2:.0f}: run time ×{last['run_s'] / first['run_s']:.2f}, "
              f"worker peak ×{last['worker_peak_mb'] / max(first['worker_peak_mb'], 1):.2f}")


if __name__ == "__main__":
    main()
