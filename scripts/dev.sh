#!/usr/bin/env bash
# One entry point for people and CI:
#   bash scripts/dev.sh setup   create .venv, install the dependencies, build dalle_fast._C
#   bash scripts/dev.sh test    setup, then run the test suite
#   bash scripts/dev.sh demo ["PROMPT" [generate options]]
#                               setup, then the main job: images for PROMPT from the bundled model
#                               (samples/rank*.png, samples/grid.png)
# Environment: PYTHON (default python3), VENV (default .venv), DALLE_FAST_CUDA (0: skip the
# CUDA kernels, 1: require them, unset: build them when nvcc and a CUDA torch are present),
# MAX_JOBS (parallel compile jobs, default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local req_stamp="$VENV/.requirements.sha"
  local req_hash
  req_hash=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
    echo "== installing dependencies (torch is large: a minute or two)"
    "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    echo "$req_hash" > "$req_stamp"
  fi
  # Rebuild the extension only when its sources or build settings changed.
  local build_stamp="$VENV/.dalle_fast_build.sha"
  local build_hash
  # The inputs of the build: sources, setup.py, the switches, the torch it links against and the
  # compilers it would use (a newly installed nvcc adds the CUDA kernels).
  build_hash=$( (find csrc -type f | sort | xargs sha256sum; sha256sum setup.py;
                 echo "${DALLE_FAST_CUDA:-auto} ${TORCH_CUDA_ARCH_LIST:-default} ${CUDA_HOME:-} ${CXX:-}";
                 command -v nvcc || true; ls /usr/local/cuda/bin/nvcc 2>/dev/null || true;
                 "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)") | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ] || ! "$PY" -c "import dalle_fast._C" 2>/dev/null; then
    echo "== building dalle_fast._C (CPU kernels, plus CUDA kernels when possible)"
    local start=$SECONDS
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --quiet --disable-pip-version-check \
      --no-build-isolation --no-deps -e .
    echo "== built in $((SECONDS - start)) s"
    echo "$build_hash" > "$build_stamp"
  fi
  "$PY" -c "import dalle_fast, json; print('== backends:', json.dumps(dalle_fast.backend_info(), indent=1))"
}

case "${1:-}" in
  setup) setup ;;
  test)
    setup
    echo "== tests"
    "$PY" -m pytest -q "${@:2}"
    ;;
  demo)
    setup
    prompt=${2:-a red circle to the left of a blue square}
    echo "== main job: dalle-fast generate \"$prompt\" with the bundled model"
    "$VENV/bin/dalle-fast" generate "$prompt" --out samples "${@:3}"
    ;;
  *)
    echo "usage: bash scripts/dev.sh setup | test [pytest args] | demo [PROMPT [generate options]]" >&2
    exit 2
    ;;
esac
