#!/usr/bin/env bash
# Record benchmark.py's table on a GPU machine: resnet18, efficientnet_b0 and ViT-S/16, each at
# 224x224 and 384x384, bf16 autocast and channels_last, all tables in one markdown file.
#
#   bash benchmark_gpu.sh [DATA_DIR] [OUTPUT]
#       DATA_DIR  train images folder (default: the bundled sample, generated on first use)
#       OUTPUT    default benchmarks/gpu_results.md; built in a temp file next to it and moved into
#                 place only when every model has run, so it is never half-written
#
# Models are randomly initialised (nothing is downloaded): weights do not change speed.
# ViTs have a fixed input size in timm, so 224 uses vit_small_patch16_224 and 384 uses
# vit_small_patch16_384 (whose default img_size is 384).
# resnet18 and efficientnet_b0 at 224 also time 2 and 4 training processes at once on the GPU
# against one (--side_by_side: do k-fold's folds pay to run side by side on one GPU?).
# Budget, estimated, never yet run: about 7 minutes on one H200 (6 runs of 30 batches of 128 x 3
# repeats each, 2 x 7 side-by-side processes that each start torch and train 90 batches, and, on a
# fresh machine, about half a minute generating the bundled sample).
set -euo pipefail
cd "$(dirname "$0")"

data_dir="${1:-}"
output="${2:-benchmarks/gpu_results.md}"
common=(--batch_size 128 --amp bf16 --channels_last on --batches 30 --repeats 3)
if [[ -n "$data_dir" ]]; then
    common+=(--data_dir "$data_dir")
fi
# model, size, extra flags
runs=(
    "resnet18 224 --side_by_side 2 4" "resnet18 384"
    "efficientnet_b0 224 --side_by_side 2 4" "efficientnet_b0 384"
    "vit_small_patch16_224 224" "vit_small_patch16_384 384"
)

mkdir -p "$(dirname "$output")"
partial="$(mktemp "$(dirname "$output")/.gpu_results.XXXXXX")"
table="$(mktemp "$(dirname "$output")/.gpu_table.XXXXXX")"
trap 'rm -f "$partial" "$table"' EXIT

{
    echo "# GPU benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
    echo "Common flags: ${common[*]}. Models randomly initialised (no downloads; speed is the same)."
} > "$partial"

started=$SECONDS
for run in "${runs[@]}"; do
    read -r model size extra <<< "$run"
    echo "=== $model ${size}x${size} ${extra} ($((SECONDS - started)) s so far)"
    # shellcheck disable=SC2086  # extra is a list of flags
    python benchmark.py --model "$model" --resize "$size" "$size" "${common[@]}" $extra \
        --output "$table"
    { echo; cat "$table"; } >> "$partial"
done

chmod 644 "$partial"  # mktemp made it private
mv "$partial" "$output"
echo "all tables -> $output ($((SECONDS - started)) s)"
