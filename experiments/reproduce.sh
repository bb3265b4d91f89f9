#!/usr/bin/env bash
# Re-run experiment grids and regenerate their committed summaries (comparison.md/.csv, plots).
# Usage: experiments/reproduce.sh            the four powered grids of issue 25 (~3.6 h on 2 cores)
#        experiments/reproduce.sh all        those and the earlier small-scale grids
#        experiments/reproduce.sh name ...   the named grids (experiments/<name>.toml)
# Resumable: `fedpeft compare` skips every run whose results.json is complete and has the same
# settings, and starts interrupted runs over, so re-running this script continues where it
# stopped. A finished run of other settings (a config edited since) is refused in one line:
# delete experiments/results/<name>/runs (or that run's directory) to run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDPEFT="${FEDPEFT:-$(command -v fedpeft || echo .venv/bin/fedpeft)}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
# the analyses a grid's verdict also reads (experiments/README.md section 9)
declare -A after=([lora_fair_powered]="late_accuracy fair_paired_round")
# minutes at load ~1-3 on 2 cores, measured where a grid ran at that load (lora_fair, compeft), else estimated (how: experiments/README.md, "Time estimates")
declare -A minutes=([ffa_lora_sample_dp_powered]=46 [ffa_lora_sample_dp_powered_nodp]=16 [lora_fair_powered]=55
                    [compeft_powered]=50 [dp_dylora_powered]=51)
powered=(ffa_lora_sample_dp_powered ffa_lora_sample_dp_powered_nodp lora_fair_powered compeft_powered dp_dylora_powered)
earlier=(lora_fair_noniid lora_fair_ridge compeft_density compeft_downlink ffa_vs_lora_sample_dp dp_dylora_user_dp
         dp_dylora_nonprivate_ref dp_utility_head dp_utility_head_nodp dp_utility_lora_r8 dp_utility_lora_r8_nodp
         sample_dp_topk dp_adapters_topk dp_adapters_topk_nodp
         dp_utility_topk dp_utility_topk_nodp)
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=("${powered[@]}")
elif [ "${names[*]}" = "all" ]; then
  names=("${powered[@]}" "${earlier[@]}")
fi
for name in "${names[@]}"; do
  echo "== $name${minutes[$name]+ (estimated ${minutes[$name]} min)}"
  start=$(date +%s)
  "$FEDPEFT" compare "experiments/$name.toml" --output "experiments/results/$name"
  echo "== $name: $(( $(date +%s) - start )) s"
  for script in ${after[$name]:-}; do
    case $script in
      late_accuracy) "$PYTHON" experiments/late_accuracy.py "experiments/results/$name" strategy=fedavg --last 3 ;;
      fair_paired_round) "$PYTHON" experiments/fair_paired_round.py "experiments/results/$name" \
                           > "experiments/results/$name/fair_paired_round.txt" ;;
    esac
  done
done
