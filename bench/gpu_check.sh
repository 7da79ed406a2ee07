#!/usr/bin/env bash
# GPU readiness check for a machine with an NVIDIA GPU. Run from anywhere, as it is:
#
#     bash bench/gpu_check.sh [--clip-weights F --dino-weights F]
#
# 1. the CUDA-marked tests (tests/cass_engine/test_gpu.py: engine on CUDA vs CPU, pinned actors);
# 2. engine_bench at batch 1/8/32 in float16 and bfloat16 for coco_stuff and voc21 (336x448);
# 3. precision_check on CUDA (fp16/bf16 vs fp32, all 8 presets);
# 4. pipeline_bench with the real engine on CUDA (one actor per GPU) and with the stub.
# Prints one table at the end; every step's full log is kept in $GPU_CHECK_DIR (default
# ./gpu_check_logs). Weights: random (same architecture and work) unless both files are given.
# Environment: PYTHON (default: python), GPU_CHECK_DIR, PIPELINE_IMAGES (default 2000).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${GPU_CHECK_DIR:-gpu_check_logs}
IMAGES=${PIPELINE_IMAGES:-2000}
WEIGHTS=("$@")
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TABLE="$LOGS/table.tsv"
printf 'check\tsetting\tresult\n' > "$TABLE"
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$TABLE"; }

if ! command -v nvidia-smi >/dev/null || ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
row gpu "$(head -1 "$LOGS/gpu.txt")" "$(nvidia-smi -L | wc -l) device(s)"

# 1. CUDA-marked tests
"$PY" -m pytest -q -m cuda tests/cass_engine/test_gpu.py -p no:cacheprovider > "$LOGS/tests.log" 2>&1
rc=$?
row "pytest -m cuda" "tests/cass_engine/test_gpu.py" "rc=$rc $(tail -1 "$LOGS/tests.log")"

# 2. engine throughput
for dtype in float16 bfloat16; do
    for batch in 1 8 32; do
        log="$LOGS/engine_${dtype}_b${batch}.log"
        "$PY" bench/engine_bench.py --device cuda --dtype "$dtype" --batch-size "$batch" \
            --repeats 5 --preset coco_stuff --preset voc21 "${WEIGHTS[@]}" > "$log" 2>&1
        rc=$?
        for preset in coco_stuff voc21; do
            line=$(grep "^\[$preset\] 336x448" "$log" | tail -1 | sed 's/.*: //')
            row "engine $preset" "$dtype batch=$batch" "${line:-FAILED rc=$rc (see $log)}"
        done
    done
done

# 3. precision against fp32 on CUDA
"$PY" bench/precision_check.py --device cuda --all-presets "${WEIGHTS[@]}" \
    > "$LOGS/precision.log" 2>&1
rc=$?
grep -E '^[a-z0-9_]+ (float16|bfloat16):' "$LOGS/precision.log" | while read -r line; do
    row precision "${line%%:*}" "${line#*: }"
done
[ $rc -eq 0 ] || row precision all "FAILED rc=$rc (see $LOGS/precision.log)"

# 4. pipeline vs engine alone (real engine on the GPU; the stub as the pipeline's ceiling)
for engine in real stub; do
    log="$LOGS/pipeline_$engine.log"
    extra=(--engine "$engine")
    [ "$engine" = real ] && extra+=(--device cuda --dtype float16 --batch-size 32 \
        --max-side 640 --images-per-shard 200)
    [ "$engine" = stub ] && extra+=(--stub-ms 0 --max-side 640)
    "$PY" bench/pipeline_bench.py --images "$IMAGES" --no-s3 "${extra[@]}" > "$log" 2>&1
    rc=$?
    row "pipeline $engine" "$IMAGES images, local disk" \
        "$(tail -1 "$log" | grep cpu_ms_per_image || echo "FAILED rc=$rc (see $log)")"
done

echo
column -t -s $'\t' "$TABLE" 2>/dev/null || cat "$TABLE"
