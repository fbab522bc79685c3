#!/usr/bin/env bash
# Make ./.venv-consumers: vLLM 0.34.0 and its own pins (torch 2.14, transformers < 5.23), which
# cannot share .venv. Only tests/consumers/judge.py runs in it, on CPU. Safe to run again.
# About 8.5 GB on disk; run through `bash scripts/install.sh --consumers`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv-consumers
vllm_version=0.34.0
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

echo "consumers install: vllm $vllm_version (without its dependencies)"
# `pip install vllm==0.34.0` does not resolve: its pin flashinfer-python==0.7.3 is not on the
# package index. flashinfer is a CUDA kernel library the CPU judge never imports, so vllm goes in
# with --no-deps and then every other requirement it declares.
pip --no-deps "vllm==$vllm_version"
pip packaging  # to read its requirements below
echo "consumers install: vllm's requirements (torch 2.14, transformers < 5.23, ...) but flashinfer"
"$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement

for line in requires("vllm") or []:
    req = Requirement(line)
    if req.marker is not None and "extra" in str(req.marker):
        continue  # optional extras
    if req.name == "flashinfer-python":
        continue  # not on the index (see above)
    if req.marker is None or req.marker.evaluate():
        print(str(req).split(";")[0])
PY
pip -r "$venv/vllm-requirements.txt"
"$venv/bin/python" -c "import vllm, torch, transformers; print('consumers install: done: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
