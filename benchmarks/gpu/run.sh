#!/usr/bin/env bash
# bridge_ext vs Megatron-Bridge on GPUs (NCCL): Qwen3-1.7B-shaped bf16 model, LoRA r16 on the
# four default targets. Run from the repository root:
#
#     bash benchmarks/gpu/run.sh                # 1 GPU (tp1), then 2 GPUs (tp2, pp2, pp2_vpp2)
#     bash benchmarks/gpu/run.sh tp1 pp2        # some of them
#
# Each layout takes about a minute (the first one also writes the random 3.4 GB Hugging Face
# folder to $HF_DIR, reused afterwards). DEVICE=cpu PRESET=small smoke-tests the script on CPU.
#
# Needs torch with CUDA, megatron-core, megatron-bridge, transformers, peft (no Transformer
# Engine, no network). Results (tables, JSON, logs) go to $OUT, else benchmarks/gpu/results.
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
RESULTS=${OUT:-benchmarks/gpu/results}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-qwen3-1.7b}
HF_DIR=${HF_DIR:-/tmp/bridge_ext_bench_$PRESET}
REPEATS=${REPEATS:-3}
mkdir -p "$RESULTS"

"$PY" - <<'PY' | tee "$RESULTS/versions.txt"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for package in ("megatron-core", "megatron-bridge", "transformers", "peft"):
    print(package, md.version(package))
PY

common=(benchmarks/export_bench.py --device "$DEVICE" --preset "$PRESET" --hf-dir "$HF_DIR" --repeats "$REPEATS" --check)
run() {  # run NAME NPROC [flags...]
    local name=$1 nproc=$2; shift 2
    echo "=== $name ===" | tee -a "$RESULTS/summary.txt"
    if [ "$nproc" = 1 ]; then
        "$PY" "${common[@]}" --json "$RESULTS/$name.json" "$@" > "$RESULTS/$name.log" 2>&1 || echo "FAILED: see $name.log"
    else
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "${common[@]}" \
            --json "$RESULTS/$name.json" "$@" > "$RESULTS/$name.log" 2>&1 || echo "FAILED: see $name.log"
    fi
    sed -n '/^device=/,$p' "$RESULTS/$name.log" | grep -v "^\[" | tee -a "$RESULTS/summary.txt" || true
}

declare -A LAYOUTS=([tp1]="1" [tp2]="2 --tp 2" [pp2]="2 --pp 2" [pp2_vpp2]="2 --pp 2 --vpp 2")
for name in "${@:-tp1 tp2 pp2 pp2_vpp2}"; do
    for layout in $name; do
        # shellcheck disable=SC2086
        run "$layout" ${LAYOUTS[$layout]}
    done
done
