#!/usr/bin/env bash
# Install bridge_ext with megatron-core and megatron-bridge into ./.venv on a CPU machine
# (Python 3.11 or newer, no GPU, no Transformer Engine). Safe to run again.
#   --consumers   instead: make ./.venv-consumers with vLLM 0.34.0, the inference engine that
#                 judges bridge_ext's exports in tests/consumers (see docs/consumers.md).
#   --compat      instead: make ./.venv-compat with the oldest versions pyproject.toml declares
#                 (scripts/requirements-oldest.txt), for the compatibility job of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [ "${1:-}" = "--consumers" ]; then
  exec bash scripts/install_consumers.sh
fi
case "${1:-}" in
  "") venv=.venv requirements=scripts/requirements-cpu.txt ;;
  --compat) venv=.venv-compat requirements=scripts/requirements-oldest.txt ;;
  *) echo "usage: bash scripts/install.sh [--consumers | --compat]" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "usage: bash scripts/install.sh [--consumers | --compat]" >&2; exit 2; }
# Made anew: a downgrade leaves packages behind (transformers 5.25 brings `kernels`, which 5.9
# then uses and fails on), so an old venv would not hold the oldest versions alone.
[ "$venv" = .venv ] || rm -rf "$venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

echo "bridge_ext install: torch (CPU build)"
# First, pinned: an unpinned torch pulled in by any other package would be a multi-GB CUDA build.
pip "torch==2.13.0"
echo "bridge_ext install: transformers, peft, safetensors and the rest"
pip -r "$requirements"
echo "bridge_ext install: megatron-core 0.19.2, megatron-bridge 0.6.2 (without their training extras)"
# They declare Python >= 3.12 but run on 3.11 (bridge_ext.compat supplies typing.override);
# --no-deps keeps megatron-bridge's ~30 training-only requirements (wandb, mlflow...) out.
pip --no-deps --ignore-requires-python "megatron-core==0.19.2" "megatron-bridge==0.6.2"
echo "bridge_ext install: bridge_ext, and its test-support package bridge_ext_testing (testing/)"
pip --no-deps -e . -e testing
echo "bridge_ext install: done ($venv/bin/bridge-ext, $venv/bin/python -m pytest)"
