#!/bin/bash
# The GPU figures of BENCHMARKS.md in one call of a lent GPU machine (~7 min; run from the
# repository root): GPU efficiency (tile_speed --headline, batch 16 (seamline run's default on a GPU now) and 4 (the CPU's)),
# model-only time against batch size, `seamline demo` on the GPU, and the same scene on the
# machine's CPU cores for a GPU-worker-against-CPU-workers figure. Logs go to $OUT (or /tmp/gpu-out).
#
# A GPU image with PyTorch but not the geospatial stack needs the missing wheels (Python 3.12,
# x86-64) unpacked on its PYTHONPATH. This script unpacks .devcarry/site312.tar.xz when present,
# built once on a machine with pip:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     affine annotated-types cligj click-plugins dask distributed donfig geopandas google-crc32c locket \
#     numcodecs partd pydantic pydantic_core pyogrio==0.10.0 pyproj rasterio shapely tblib tornado \
#     typing-inspection zarr zict          # versions as in this repository's .venv (pip list)
#   pip install --no-deps --no-compile --target site312 --python-version 3.12 --only-binary=:all: \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 .whl/*.whl
#   (drop tests/ folders; point pyogrio/proj_data and pyproj/proj_dir/share/proj at rasterio/proj_data)
#   tar cf - site312 | xz -9 > .devcarry/site312.tar.xz      # ~57 MB
# With the repository's tracked files the tarball must fit the device tool's 64 MiB: take the model
# weights this script does not use (buildings, nuclei-fluo, nuclei-he) out of the working tree for
# the call (git checkout -- models/zoo afterwards).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }
if [ -f .devcarry/site312.tar.xz ]; then
    stamp "unpack the wheels"
    tar xJf .devcarry/site312.tar.xz -C /tmp || exit 1
    export PYTHONPATH=/tmp/site312:$PYTHONPATH
fi
export PYTHONPATH=$PWD:$PWD/benchmarks:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import sys, torch, torchvision, dask, rasterio, pyogrio, shapely, zarr, numpy
print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device", "dask", dask.__version__,
      "rasterio", rasterio.__version__, "pyogrio", pyogrio.__version__, "shapely", shapely.__version__,
      "zarr", zarr.__version__, "numpy", numpy.__version__)
import workflows.run, workflows.cli  # noqa: F401  (every import the runs below need)
PY
stamp "generate a 6144² scene"
python3 -c "from pipeline.synthetic_raster import write_scene; write_scene('/tmp/scene.tif', seed=1, height=6144, width=6144)"
quiet() { grep -v "UserWarning\|warnings.warn"; }
stamp "tile_speed on the GPU, batch 16"
timeout 180 python3 benchmarks/tile_speed.py --image /tmp/scene.tif --batch-size 16 --headline --repeats 2 --device cuda 2>&1 | quiet | tee "$OUT/tile_speed_gpu_b16.txt"
stamp "model only against batch size"
timeout 60 python3 benchmarks/batch_sweep.py --device cuda --size 3072 --batch-sizes 1 4 8 16 32 --repeats 5 2>&1 | tee "$OUT/batch_sweep_gpu.txt"
stamp "seamline demo on the GPU"
timeout 60 python3 -c "from workflows.entry import main; main()" demo --out /tmp/demo-out 2>&1 | tail -15 | tee "$OUT/demo_gpu.txt"
stamp "the same scene on this machine's CPU cores, batch 4"
SEAMLINE_DEVICE=cpu timeout 100 python3 benchmarks/tile_speed.py --image /tmp/scene.tif --batch-size 4 --headline --repeats 1 --device cpu 2>&1 | quiet | tee "$OUT/tile_speed_cpu.txt"
stamp "tile_speed on the GPU, batch 4 (seamline run's default)"
timeout 90 python3 benchmarks/tile_speed.py --image /tmp/scene.tif --batch-size 4 --headline --repeats 1 --device cuda 2>&1 | quiet | tee "$OUT/tile_speed_gpu_b4.txt"
stamp done
