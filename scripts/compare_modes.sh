#!/usr/bin/env bash
# Issue 9's comparison on the tiny config: offline DPO, HyPO, online DPO (ρ = 1) and OPTune
# (ρ = 0.5), each with the current (π_t) and the initial (π_0) reference (HyPO: π_0 only, design §5);
# then the report.
# Usage: bash scripts/compare_modes.sh [OUT_DIR] [extra --set overrides...]
set -euo pipefail
out=${1:-runs/modes_tiny}
shift || true
py=${PYTHON:-.venv/bin/python}
for ref in current initial; do
  for variant in "offline:dpo:1.0" "hypo:hypo:1.0" "optune:dpo:1.0" "optune:dpo:0.5"; do
    IFS=: read -r mode loss rho <<<"$variant"
    [ "$loss" = hypo ] && [ "$ref" != initial ] && continue
    dir="$out/${mode}_${loss}_rho${rho}_${ref}"
    [ -f "$dir/summary.md" ] && continue
    flag=--overwrite; [ -f "$dir/config.yaml" ] && flag=--resume
    "$py" -m optune_jax.train --config configs/tiny.yaml --no-progress --no-export $flag \
      --set run.mode="$mode" --set loss.name="$loss" --set optune.rho="$rho" \
      --set optune.reference="$ref" --set run.output_dir="$dir" "$@"
  done
done
"$py" -m optune_jax.study.report "$out"/* --out docs/results/modes_tiny
