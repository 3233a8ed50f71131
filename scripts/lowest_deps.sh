#!/usr/bin/env bash
# Installs the lowest versions pyproject.toml's ranges allow into a fresh virtual environment
# and runs the fast tests there: checks that the lower bounds are ones that work.
#
#   scripts/lowest_deps.sh [VENV] [PYTEST ARGS...]
#
# uv's `--resolution lowest-direct` takes each of ff_jax's own requirements (and its test
# extra's) at the lowest version its range and the others' requirements allow, and everything
# else at its newest. Without PYTEST ARGS it runs the fast tests (-m "not slow") of the config,
# mesh, model, GGUF, Hub, training loop and logs, golden finetune, data, eval and report modules
# (about a quarter of an hour on a shared 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lowest}
shift || true
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=(tests/test_config.py tests/test_parallel.py tests/models/test_model.py
         tests/models/test_gguf.py tests/models/test_hub.py tests/training/test_loop.py
         tests/training/test_logging.py tests/training/test_finetune_golden.py tests/data
         tests/eval tests/report)
fi
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q uv
"$venv/bin/uv" pip install --python "$venv/bin/python" --resolution lowest-direct -e '.[test]'
"$venv/bin/python" -m pip check
"$venv/bin/python" -m pip list --format freeze 2>/dev/null \
  | grep -iE '^(jax|jaxlib|libtpu|flax|orbax-checkpoint|optax|numpy|transformers|tokenizers|huggingface-hub|safetensors|gguf|pyarrow|matplotlib|tensorboardx|rouge-score|pyyaml|jinja2|pytest|datasets|tensorflow-datasets|gcsfs|google-cloud-storage)=='
start=$(date +%s)
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "${tests[@]}"
echo "lowest_deps: tests passed in $(( $(date +%s) - start )) s"
