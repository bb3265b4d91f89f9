#!/usr/bin/env bash
# Re-run every experiment grid and regenerate its committed summary (comparison.md/.csv, plots).
# Usage: experiments/reproduce.sh [name ...]   (default: all; run from anywhere)
# Finished cells are skipped, so an interrupted run continues where it stopped; delete
# experiments/results/<name>/runs to start a grid from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDPEFT="${FEDPEFT:-$(command -v fedpeft || echo .venv/bin/fedpeft)}"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(lora_fair_noniid lora_fair_ridge compeft_density compeft_downlink ffa_vs_lora_sample_dp dp_dylora_user_dp dp_dylora_nonprivate_ref
         dp_utility_head dp_utility_head_nodp dp_utility_lora_r8 dp_utility_lora_r8_nodp
         sample_dp_topk dp_adapters_topk dp_adapters_topk_nodp)
fi
for name in "${names[@]}"; do
  echo "== $name"
  start=$(date +%s)
  "$FEDPEFT" compare "experiments/$name.toml" --output "experiments/results/$name"
  echo "== $name: $(( $(date +%s) - start )) s"
done
