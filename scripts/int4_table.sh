#!/usr/bin/env bash
# The weight-only accuracy table of README.md ("Weight-only int4"): stories260K, per channel (no group size
# divides its 172-wide MLP), calibration 64 x 256 tokens of tinystories-train, KL from the float model on
# the first 48 windows of 512 tokens of tinystories-valid and wikitext-2.
#   scripts/int4_table.sh ../shared/models/stories260K-hf ../shared/text /tmp/int4
set -euo pipefail
M=$1; T=$2; W=${3:-/tmp/int4}
C="--calib-dataset $T/tinystories-train.txt --calib-samples 64 --calib-seqlen 256 --seed 0 --device cpu"
mkdir -p "$W"
recipe() {  # name, steps YAML
  printf "steps:\n%s\nformat: compressed-tensors\n" "$2" > "$W/$1.yaml"
  lite run "$W/$1.yaml" "$M" --work-dir "$W/work-$1" --out-dir "$W/$1" $C > /dev/null
}
recipe rtn-asym "  - rtn: {bits: 4, group_size: -1, symmetric: false}"
recipe rtn-sym "  - rtn: {bits: 4, group_size: -1, symmetric: true}"
recipe rtn-clip-asym "  - rtn: {bits: 4, group_size: -1, symmetric: false, mse: true}"
recipe rtn-clip-sym "  - rtn: {bits: 4, group_size: -1, symmetric: true, mse: true}"
lite auto_gptq "$M" --work-dir "$W/work-gptq-asym" --out-dir "$W/gptq-asym" --w-group-size -1 --w-sym false $C > /dev/null
lite auto_gptq "$M" --work-dir "$W/work-gptq-sym" --out-dir "$W/gptq-sym" --w-group-size -1 $C > /dev/null
lite auto_awq "$M" --work-dir "$W/work-awq-asym" --out-dir "$W/awq-asym" --w-group-size -1 --format compressed-tensors $C > /dev/null
recipe awq-gptq-asym "  - awq: {bits: 4, group_size: -1, symmetric: false}
  - gptq: {bits: 4, group_size: -1, symmetric: false, mse: true}"
# Groups of 32 where they divide (the 64-input linears), per channel for down_proj (172 inputs).
G="--w-group-size 32 --w-channel-fallback"
recipe rtn-g32-asym "  - rtn: {bits: 4, group_size: 32, symmetric: false, channel_fallback: true}"
lite auto_gptq "$M" --work-dir "$W/work-gptq-g32-asym" --out-dir "$W/gptq-g32-asym" $G --w-sym false $C > /dev/null
lite auto_gptq "$M" --work-dir "$W/work-gptq-g32-sym" --out-dir "$W/gptq-g32-sym" $G $C > /dev/null
lite auto_awq "$M" --work-dir "$W/work-awq-g32-asym" --out-dir "$W/awq-g32-asym" $G --format compressed-tensors $C > /dev/null
for d in tinystories-valid.txt wikitext-2-raw-test.txt; do
  lite eval "$M" "$W"/rtn-g32-asym "$W"/gptq-g32-asym "$W"/gptq-g32-sym "$W"/awq-g32-asym --dataset "$T/$d" \
    --max-windows 48 --device cpu --json-out "$W/g32-$d.json" 2>/dev/null | grep -v "^Loading"
done
for d in tinystories-valid.txt wikitext-2-raw-test.txt; do
  lite eval "$M" "$W"/rtn-asym "$W"/rtn-sym "$W"/rtn-clip-asym "$W"/rtn-clip-sym "$W"/gptq-asym "$W"/gptq-sym \
    "$W"/awq-asym "$W"/awq-gptq-asym --dataset "$T/$d" --max-windows 48 --device cpu --json-out "$W/$d.json" 2>/dev/null \
    | grep -v "^Loading"
  # The symmetric pack-quantized folders through transformers' own compressed-tensors loader.
  python scripts/eval_transformers.py "$M" "$W"/rtn-sym "$W"/gptq-sym --dataset "$T/$d" --samples 48 --device cpu 2>/dev/null \
    | grep -v "^Loading"
done
