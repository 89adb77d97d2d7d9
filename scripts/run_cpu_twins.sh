#!/usr/bin/env bash
# Run the CPU-scale twins of the paper grids (grids/cpu/*.yaml) one after another on the embedded
# local Ray, then write each one's report under <results>/cpu/<twin>/ and its wall time to
# <results>/cpu/timings.csv. All twins share one storage root, so a stage computed by one twin (the
# split, the classifiers, a prior) is reused by the next: a twin's time is what it added.
#
# usage: scripts/run_cpu_twins.sh [TWIN ...]   (default: every twin, in the order below)
# env:   DIFFMI_RESULTS  storage root (default: ./results)
#        DIFFMI_BIN      the CLI (default: .venv/bin/diffmi-ray)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DIFFMI_BIN:-.venv/bin/diffmi-ray}
RESULTS=${DIFFMI_RESULTS:-results}
TWINS=("$@")
if [ ${#TWINS[@]} -eq 0 ]; then
  TWINS=(table1 table2 table3 table4 table5 table6 table7 table9_fashion table10 fig6c fig6d fig6b)
fi
mkdir -p "$RESULTS/cpu"
TIMINGS=$RESULTS/cpu/timings.csv
[ -f "$TIMINGS" ] || echo "twin,started_utc,wall_s,exit_status,stage_instances,already_done" > "$TIMINGS"
for twin in "${TWINS[@]}"; do
  grid=grids/cpu/$twin.yaml
  [ -f "$grid" ] || { echo "no such twin: $grid" >&2; exit 2; }
  read -r total already < <("$BIN" plan "$grid" --storage "$RESULTS" | awk '$1=="total"{print $2, $4}')
  start=$(date -u +%FT%TZ); t0=$(date +%s)
  set +e; "$BIN" run "$grid" --storage "$RESULTS" > "$RESULTS/cpu/$twin.run.log" 2>&1; rc=$?; set -e
  wall=$(( $(date +%s) - t0 ))
  echo "$twin,$start,$wall,$rc,$total,$already" >> "$TIMINGS"
  echo "$twin: exit $rc after ${wall}s ($total stage instances, $already of them already done)"
  "$BIN" report "$grid" --storage "$RESULTS" --out "$RESULTS/cpu/$twin" > /dev/null
done
