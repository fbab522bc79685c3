#!/usr/bin/env bash
# bridge_ext vs Megatron-Bridge on GPUs (NCCL), one command per layout. From the repository root:
#
#     bash benchmarks/gpu/run.sh                    # every layout below, in this order
#     bash benchmarks/gpu/run.sh moe_ep1 sync       # some of them
#
# Layouts (export benchmark, benchmarks/export_bench.py):
#   tp1 (1 GPU), tp2, pp2, pp2_vpp2     dense Qwen3-1.7B shape, LoRA r16 on the four default targets
#   moe_ep1 (1 GPU), moe_ep2, moe_tp2, moe_pp2
#                                        Qwen3.5-MoE shape (35B-A3B widths, 8 layers + MTP, 256
#                                        experts), LoRA r16 on every target incl. GDN and experts
#   moe3_ep1 (1 GPU), moe3_ep2           Qwen3-MoE shape (30B-A3B widths, 8 layers, 128 experts),
#                                        LoRA r16 on linear_qkv/linear_proj/linear_fc1/linear_fc2
#                                        incl. routed experts
# Whole weight sync (benchmarks/sync_bench.py, trainer on GPU 0, receiver on GPU 1):
#   sync (Qwen3.5-MoE shape), sync_dense (Qwen3-1.7B shape); sync_fp32: the Qwen3.5-MoE sync in
#   float32, where the logits check compares without bf16 rounding (one run)
#
# The dense layouts write a random 3.4 GB Hugging Face folder once ($HF_ROOT); the MoE models
# are initialised on the GPU (their folders hold config and key index only). DEVICE=cpu
# runs the tiny presets on CPU (a smoke test of the scripts). PROFILE=1 adds torch.profiler
# tables of one run per mode. Needs torch with CUDA, megatron-core, megatron-bridge,
# transformers, peft (no Transformer Engine, no network). Results (tables, JSON, logs) go to
# $OUT, else benchmarks/gpu/results.
set -euo pipefail
export PYTHONPATH="$PWD:$PWD/testing${PYTHONPATH:+:$PYTHONPATH}"  # bridge_ext and its test support
PY=${PYTHON:-python}
RESULTS=${OUT:-benchmarks/gpu/results}
DEVICE=${DEVICE:-cuda}
HF_ROOT=${HF_ROOT:-/tmp}
REPEATS=${REPEATS:-3}
mkdir -p "$RESULTS"

"$PY" - <<'PY' | tee "$RESULTS/versions.txt"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for package in ("megatron-core", "megatron-bridge", "transformers", "peft"):
    print(package, md.version(package))
PY

preset() {  # the preset a layout family runs (tiny ones on CPU)
    case "$1:$DEVICE" in
        dense:cuda) echo qwen3-1.7b ;; dense:*) echo small ;;
        moe:cuda) echo qwen35-moe ;; moe:*) echo qwen35-moe-tiny ;;
        moe3:cuda) echo qwen3-moe ;; moe3:*) echo qwen3-moe-tiny ;;
    esac
}

launch() {  # launch NPROC SCRIPT [flags...]
    local nproc=$1; shift
    if [ "$nproc" = 1 ]; then
        "$PY" "$@"
    else
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$@"
    fi
}

run() {  # run NAME FAMILY NPROC [flags...]
    local name=$1 family=$2 nproc=$3; shift 3
    local p; p=$(preset "$family")
    local flags=(--device "$DEVICE" --preset "$p" --hf-dir "$HF_ROOT/bridge_ext_bench_$p" --repeats "$REPEATS"
                 --json "$RESULTS/$name.json")
    echo "=== $name ===" | tee -a "$RESULTS/summary.txt"
    if [[ $name == sync* ]]; then
        launch 1 benchmarks/sync_bench.py "${flags[@]}" "$@" > "$RESULTS/$name.log" 2>&1 || echo "FAILED: see $name.log"
        sed -n '/^weight sync:/,$p' "$RESULTS/$name.log" | grep -v "^\[" | tee -a "$RESULTS/summary.txt" || true
        return
    fi
    [ -n "${PROFILE:-}" ] && flags+=(--profile "$RESULTS/profile-$name")
    [[ " $* " == *" --mb-modes "* ]] || flags+=(--check)  # a partial Megatron-Bridge run skips the checks
    launch "$nproc" benchmarks/export_bench.py "${flags[@]}" "$@" > "$RESULTS/$name.log" 2>&1 \
        || echo "FAILED: see $name.log"
    sed -n '/^device=/,$p' "$RESULTS/$name.log" | grep -v "^\[" | tee -a "$RESULTS/summary.txt" || true
}

declare -A LAYOUTS=(
    [tp1]="dense 1" [tp2]="dense 2 --tp 2" [pp2]="dense 2 --pp 2" [pp2_vpp2]="dense 2 --pp 2 --vpp 2"
    [moe_ep1]="moe 1" [moe_ep2]="moe 2 --ep 2" [moe_tp2]="moe 2 --tp 2" [moe_pp2]="moe 2 --pp 2 --mb-modes adapters"
    [moe3_ep1]="moe3 1" [moe3_ep2]="moe3 2 --ep 2"
    [sync]="moe 1" [sync_dense]="dense 1" [sync_fp32]="moe 1 --dtype float32 --repeats 1"
)
for name in ${@:-tp1 tp2 pp2 pp2_vpp2 moe_ep1 moe_ep2 moe_tp2 moe_pp2 moe3_ep1 moe3_ep2 sync sync_dense}; do
    # shellcheck disable=SC2086
    run "$name" ${LAYOUTS[$name]}
done
