#!/usr/bin/env bash
# The reward–KL frontier on the main task (configs/smollm2_ifeval.yaml): OPTune ρ = 0.5 (the main
# job), online DPO-style regeneration of every prompt (ρ = 1), offline DPO on D_0 sampled once
# from π_0, and HyPO (offline DPO + KL on online samples); then the report and its plots.
# HyPO draws 2 online samples per prompt every 2nd step (4 every step would triple its cost).
# Usage: bash scripts/frontier.sh [OUT_DIR] [extra --set overrides...]   (~1 h on 2 CPU cores)
set -euo pipefail
out=${1:-runs/frontier_smollm2}
shift || true
py=${PYTHON:-.venv/bin/python}
for variant in "optune:wdpo:0.5" "optune:wdpo:1.0" "offline:dpo:1.0" "hypo:hypo:1.0"; do
  IFS=: read -r mode loss rho <<<"$variant"
  dir="$out/${mode}_${loss}_rho${rho}"
  [ -f "$dir/summary.md" ] && continue
  flag=--overwrite; [ -f "$dir/config.yaml" ] && flag=--resume
  extra=(); [ "$mode" = hypo ] && extra=(--set hypo.samples_per_prompt=2 --set hypo.every=2)
  "$py" -m optune_jax.train --config configs/smollm2_ifeval.yaml --no-progress --no-export $flag \
    --set run.mode="$mode" --set loss.name="$loss" --set optune.rho="$rho" \
    --set run.output_dir="$dir" "${extra[@]}" "$@"
done
"$py" -m optune_jax.report "$out"/* --out docs/results/frontier_smollm2
