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
# Budget: about 5 minutes on one H200 (6 runs of 30 batches of 128 x 3 repeats each, plus
# start-up and, on a fresh machine, about half a minute generating the bundled sample).
set -euo pipefail
cd "$(dirname "$0")"

data_dir="${1:-}"
output="${2:-benchmarks/gpu_results.md}"
common=(--batch_size 128 --amp bf16 --channels_last --batches 30 --repeats 3)
if [[ -n "$data_dir" ]]; then
    common+=(--data_dir "$data_dir")
fi
runs=(
    "resnet18 224" "resnet18 384"
    "efficientnet_b0 224" "efficientnet_b0 384"
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
    read -r model size <<< "$run"
    echo "=== $model ${size}x${size} ($((SECONDS - started)) s so far)"
    python benchmark.py --model "$model" --resize "$size" "$size" "${common[@]}" --output "$table"
    { echo; cat "$table"; } >> "$partial"
done

chmod 644 "$partial"  # mktemp made it private
mv "$partial" "$output"
echo "all tables -> $output ($((SECONDS - started)) s)"
