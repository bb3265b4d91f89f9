#!/usr/bin/env bash
# Seeded runs whose results a refactor must not change (issue 27's "same behaviour" check).
# Usage: tools/behaviour_snapshot.sh OUT_DIR     (runs already in OUT_DIR are kept)   then     python tools/same_results.py BEFORE AFTER
# Seven small configurations that between them cross every stage, strategy family, server
# optimiser, checkpoint/EMA/export and the causal-LM task; DP runs use
# --insecure-reproducible-noise so that the same seed gives the same noise (research only).
set -euo pipefail
out=${1:?usage: tools/behaviour_snapshot.sh OUT_DIR}
FEDPEFT="${FEDPEFT:-$(command -v fedpeft || echo .venv/bin/fedpeft)}"
small=(--clients 8 --cohort 4 --rounds 2 --max-client-examples 64 --max-test-examples 200 --seed 3)
declare -A runs=(
  [compeft]="--compression compeft --density 0.1"
  [fedsa]="--strategy fedsa-lora --partition dirichlet --dirichlet-alpha 0.5"
  [flora_ranks]="--strategy flora --client-ranks 2,4,8"
  [fair_stc_fedadam]="--strategy lora-fair --compression stc --density 0.2 --compress-down --server-opt fedadam --server-lr 0.01 --ema 0.9 --checkpoint-every 1"
  [user_dp]="--clients 40 --cohort 20 --dp user --epsilon 4 --adaptive-clip --insecure-reproducible-noise"
  [sample_dp]="--dp sample --epsilon 4 --train-top-k 1 --insecure-reproducible-noise"
  [causal_lm]="--task causal-lm --max-length 32"
)
for name in compeft fedsa flora_ranks fair_stc_fedadam user_dp sample_dp causal_lm; do
  [ -f "$out/$name/results.json" ] && { echo "$name: done before"; continue; }
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$FEDPEFT" simulate "${small[@]}" ${runs[$name]} --output "$out/$name" > "$out.$name.log" 2>&1 \
    || { echo "$name failed: see $out.$name.log"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s"
done
