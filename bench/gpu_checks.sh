#!/usr/bin/env bash
# The checks a session with a GPU machine runs, in one go: gsplat's JIT build, the CUDA-marked tests (CPU rasterizer vs
# gsplat parity, Algorithm 1 on CUDA), and the CUDA figures of the rasterizer, memory-attention and training benchmarks.
#
#   bash bench/gpu_checks.sh OUT SCENE [TEXTS]
#
# Run from the repository root with a CUDA torch, nvcc and gsplat importable (pip install gsplat==1.5.3). SCENE is a
# demo scene directory (pybullet need not be installed there); TEXTS an embeddings file written by
# `bench/bench_train.py --texts FILE` on a machine with the text model (see that script). Results land in OUT.
set -u
out=${1:?results directory}
scene=${2:?scene directory}
texts=${3:-}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/m3_torch_extensions}
# One architecture (this GPU's) and every core: gsplat's build takes minutes, most of them in its raster kernels.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step() { echo "== $(date +%T) $*"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

step "gsplat JIT build (background) + CPU rasterizer build"
(time python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat CUDA build failed'") \
  >"$out/gsplat_build.log" 2>&1 &
gsplat_build=$!
python3 -m m3_memory.cli.build_raster >"$out/cpu_raster_build.log" 2>&1 || tail -20 "$out/cpu_raster_build.log"

step "memory attention on CUDA"
python3 bench/bench_attention.py --device cuda --banks 64 256 1024 4096 --repeats 5 --out "$out/attention_cuda"

wait "$gsplat_build" && step "gsplat built: $(tail -3 "$out/gsplat_build.log" | tr '\n' ' ')" \
  || { step "gsplat build FAILED"; tail -40 "$out/gsplat_build.log"; exit 1; }

step "CUDA-marked tests"
python3 -m pytest -q -p no:cacheprovider -m cuda test/test_raster.py test/test_psc.py 2>&1 | tee "$out/pytest_cuda.log"

step "rasterizer benchmark, gsplat"
python3 bench/bench_raster.py --backend cuda --out "$out/raster_cuda"

step "training + locate benchmark on CUDA (default settings)"
python3 bench/bench_train.py --device cuda --scene "$scene" ${texts:+--texts "$texts"} --out "$out/train_cuda"

step "M3 vs feature distillation on CUDA (default settings, every 8th view held out)"
python3 bench/bench_m3_vs_distill.py --scene "$scene" ${texts:+--texts "$texts"} --out "$out/m3_vs_distill_cuda"
step done
