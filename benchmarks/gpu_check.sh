#!/usr/bin/env bash
# One-shot check for a lent GPU, prepared so that one call does everything in under 8 minutes:
# device and versions; onnxruntime-gpu installed from the wheel parts in .ort-parts/ (docs/gpu.md)
# and checked on a tiny float16 graph; then latency.py on `sd21 --random-weights` at 512x512,
# batch 1 and 8: PyTorch eager fp32 and fp16, torch.compile fp16 with CUDA graphs on every
# component (channels-last), onnxruntime-CUDA fp32 and fp16 through the runtime's own backend
# (IO binding, CUDA graphs on the static dirs), and TensorRT when it imports. Each backend group
# runs in its own process under its own time limit, writing its JSON as it measures, so one slow
# part cannot take the others down; the parts are then merged.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            OUT_DIR: ${OUT:-benchmarks/results/gpu}
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  every column's CPU code path, tiny preset
#
# Run from the repository root with plain python3 (PYTHON overrides it, e.g. for tests). A
# machine without CUDA runs the CPU fallback. Writes: gpu_check.log, latency_<preset>_<dev>.json
# and .md, parts/*.json (one per backend group).
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
PYTHON=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}   # the whole script's budget (the lease allows 8 minutes)
MERGE_RESERVE_S=25                  # kept back for the merge at the end
START=$(date +%s)

mkdir -p "$OUT_DIR/parts" || exit 1
rm -f "$OUT_DIR"/parts/*.json   # parts of an earlier run must not be merged into this one
PARTS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
trap 'rm -rf "$PARTS"' EXIT
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

WHEELS=()
if [ "$DRY" = 0 ] && ls .ort-parts/*.parts.json > /dev/null 2>&1; then
    # onnxruntime-gpu is larger than one transfer: its parts came one per call (docs/gpu.md).
    ORT_WHEEL=$(python3 benchmarks/wheel_parts.py join --dir .ort-parts --out "$PARTS/wheel") \
        && WHEELS+=("$ORT_WHEEL") || echo "onnxruntime-gpu parts: see the message above"
fi
if [ "$DRY" = 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
    WHEELS+=(.whl/*.whl)  # packages the GPU image lacks (diffusers, polygraphy, ...)
fi
if [ "${#WHEELS[@]}" -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS[@]}" \
        || echo "installing the carried wheels failed: the steps below may not import"
    export PYTHONPATH=/tmp/site:$PWD  # before site-packages: onnxruntime-gpu shadows onnxruntime
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "=== $* (t=$(elapsed)s)"; }

section "device and versions"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
"$PYTHON" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "diffusers", "peft", "onnx", "onnxruntime", "tensorrt", "numpy"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: does not import ({type(e).__name__}: {str(e)[:100]})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
              f"{p.multi_processor_count} SMs")
except ImportError:
    pass
EOF

has() { "$PYTHON" -c "$1" > /dev/null 2>&1; }
CUDA=0; has "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && CUDA=1
TRT=0; has "import tensorrt" && TRT=1

section "onnxruntime on CUDA: a tiny float16 graph"
ORT_CUDA=0
"$PYTHON" benchmarks/ort_smoke.py $([ "$DRY" = 1 ] && echo --cpu) && ORT_CUDA=1
echo "tensorrt imports: $TRT; onnxruntime float16 graph on CUDA: $ORT_CUDA"

ALL=saipe,predictor,vae_encoder,unet,vae_decoder
if [ "$DRY" = 1 ] || [ "$CUDA" = 0 ]; then
    [ "$DRY" = 0 ] && echo "no CUDA GPU visible: running the CPU fallback (tiny preset)"
    # The GPU columns' code paths on the CPU: fp32 compile stands in for compiled-fp16 (three
    # components: compiling all five takes minutes on two cores), ort-fp16 runs on the CPU.
    DEVICE=cpu; PRESET=tiny; SIZE=64; BATCH=1,2; WARMUP=0; RUNS=2
    EAGER=eager; COMPILED=compiled; COMPILE=predictor,vae_encoder,vae_decoder
    ORT=ort,ort-fp16,ort-int8; TRT_BACKEND=""; TRT8=""; [ "$ORT_CUDA" = 1 ] || ORT=""
else
    DEVICE=cuda; PRESET=sd21; SIZE=512; BATCH=1,8; WARMUP=3; RUNS=10
    EAGER=eager,eager-fp16; COMPILED=compiled-fp16; COMPILE=$ALL
    ORT=""; [ "$ORT_CUDA" = 1 ] && ORT=ort,ort-fp16
    TRT_BACKEND=""; [ "$TRT" = 1 ] && TRT_BACKEND=trt
    # 8-bit engines (int8; fp8 needs Ada/Hopper, which the export checks): after fp16.
    TRT8=""; [ "$TRT" = 1 ] && TRT8=trt-int8,trt-fp8
fi

# step NAME LIMIT_S BACKENDS [extra latency.py options]: one backend group, own process.
step() {
    local name=$1 limit=$2 backends=$3; shift 3
    local left=$(( TOTAL_S - MERGE_RESERVE_S - $(elapsed) ))
    if [ -z "$backends" ]; then echo "[$name] skipped: not available here"; return; fi
    if [ "$left" -lt 30 ]; then echo "[$name] skipped: ${left}s left of the budget"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    section "$name: $backends (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$PYTHON" benchmarks/latency.py \
        --preset "$PRESET" --random-weights --device "$DEVICE" --size "$SIZE" \
        --batch "$BATCH" --backends "$backends" --warmup "$WARMUP" --runs "$RUNS" \
        --budget 60 --out "$PARTS" --name "$name" "$@" > "$PARTS/$name.stdout"
    local rc=$?
    [ "$rc" -ne 0 ] && echo "[$name] exit status $rc (124: time limit; what it measured is kept)"
    [ -f "$PARTS/$name.json" ] && cp "$PARTS/$name.json" "$OUT_DIR/parts/"
}

step eager 120 "$EAGER"
step compiled 200 "$COMPILED" --compile "$COMPILE" --channels-last --no-flops
# Static 512x512 dirs (CUDA graphs), batch 1..8, exported here: kept in $ONNX_DIR across reruns.
ONNX_DIR=${GPU_CHECK_ONNX_DIR:-/tmp/sodiff-gpu-check-onnx}
step ort 200 "$ORT" --no-flops --onnx-dir "$ONNX_DIR"
step trt 240 "$TRT_BACKEND" --no-flops --onnx-dir "$ONNX_DIR"
step trt8 200 "$TRT8" --no-flops --onnx-dir "$ONNX_DIR"

section "merged report"
RESULT="latency_${PRESET}_${DEVICE}"
shopt -s nullglob
parts=("$OUT_DIR"/parts/*.json)
if [ "${#parts[@]}" -eq 0 ]; then
    echo "no measurements were written"; exit 1
fi
"$PYTHON" benchmarks/report.py "${parts[@]}" --out "$OUT_DIR" --name "$RESULT" || exit 1
echo "wrote $OUT_DIR/$RESULT.json and .md in $(elapsed)s"
