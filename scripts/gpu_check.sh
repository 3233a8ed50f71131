#!/usr/bin/env bash
# GPU checks of one machine, in one go (what a short device lease allows): the GPU-only tests
# (cuDNN attention against the einsum path), then `ff-jax bench` on the 1.1B preset with cuDNN
# attention and with the einsum path, then the CPU acceptance preset in bf16. Each step has its
# own time limit so a slow one does not take the others' results with it. Results go to $OUT
# (default ./gpu_out): one log and one JSON per bench.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax',
flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/models/test_gpu.py 2>&1 | tail -15
bench() {  # name, time limit, overrides...
  local name=$1 limit=$2
  shift 2
  echo "== bench $name: $*"
  timeout "$limit" $PY -m ff_jax.cli bench "$@" --json "$OUT/bench-$name.json" 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000" | tail -12
}
bench gpu-cudnn 170 configs/bench-gpu.yaml model.attention=cudnn
bench gpu-einsum 150 configs/bench-gpu.yaml model.attention=einsum
bench small-bf16 90 configs/bench.yaml model.dtype=bfloat16 batch_size=32 peak_matmul_size=8192
