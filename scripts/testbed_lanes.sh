#!/usr/bin/env bash
# The CPU testbed's sweeps (docs/testbed.md) in session-sized pieces: two lanes of one thread each, each lane
# running its sweeps in order, resumed from the archive in docs/results/, for HOURS.
#
#   scripts/testbed_lanes.sh run HOURS      # resume both lanes; after HOURS, stop what still runs; returns then
#   scripts/testbed_lanes.sh archive        # archive every lane sweep's finished runs, rewrite the results pages
#
# At HOURS the run in progress is stopped, not waited for: a stage resumes from its last checkpoint (every 16
# steps in the testbed's configs) and an evaluation starts again, so a stop costs minutes. Waiting instead for a
# run to fit (`ftguard sweep --stop-after`, judged by the longest run so far) left a lane idle for up to an hour
# at the end of each session.
#
# A lane moves on to its next sweep only when the current one is complete, so the order below is the order in
# which the study's tables fill: lane A calibrates the alignment-stage defenses (which then join the study), then
# looks at a second model; lane B runs the study, the strong attack, the uncalibrated defenses, the attack suite.
# OUT (default runs/sweeps) and UNITS (default runs/units, shared by every sweep) can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

LANE_A=(testbed-align-calibration testbed-gemma3-defenses)
LANE_B=(testbed-study testbed-study-strong testbed-study-uncalibrated cpu-attack-suite)
OUT=${OUT:-runs/sweeps}
UNITS=${UNITS:-runs/units}
FTGUARD=${FTGUARD:-.venv/bin/ftguard}
PYTHON=${PYTHON:-.venv/bin/python}

complete() {  # is sweep $1's every run finished in $OUT/$1?
  "$FTGUARD" sweep "sweeps/$1" --output-dir "$OUT/$1" --report --json 2>/dev/null \
    | "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["complete"] else 1)'
}

lane() {  # lane END_EPOCH SWEEP...: run each sweep until it is complete or the time is up
  local end=$1
  shift
  for sweep in "$@"; do
    mkdir -p "$OUT/$sweep"
    if [ -d "docs/results/$sweep" ]; then cp -rn "docs/results/$sweep/." "$OUT/$sweep/"; fi
    complete "$sweep" && continue
    local left=$((end - $(date +%s)))
    if [ "$left" -le 600 ]; then return 0; fi
    OMP_NUM_THREADS=1 timeout "$left" "$FTGUARD" sweep "sweeps/$sweep" --output-dir "$OUT/$sweep" \
      --units-dir "$UNITS" >>"$OUT/$sweep/lane.log" 2>&1 || true
    complete "$sweep" || return 0  # stopped for time: the next sweep waits for this one
  done
}

archive() {
  for sweep in "${LANE_A[@]}" "${LANE_B[@]}"; do
    [ -d "$OUT/$sweep/runs" ] || continue
    "$FTGUARD" sweep "sweeps/$sweep" --output-dir "$OUT/$sweep" --report >/dev/null || true  # 1: incomplete
    cp "src/ftguard/configs/sweeps/$sweep.yaml" "$OUT/$sweep/sweep.yaml"
    "$PYTHON" scripts/archive_sweep.py "$OUT/$sweep" "docs/results/$sweep"
  done
  make results-pages
}

case "${1:-}" in
  run)
    hours=${2:?usage: scripts/testbed_lanes.sh run HOURS}
    end=$(($(date +%s) + $("$PYTHON" -c "print(int(float('$hours') * 3600))")))
    lane "$end" "${LANE_A[@]}" &
    lane "$end" "${LANE_B[@]}" &
    wait
    ;;
  archive) archive ;;
  *)
    echo "usage: scripts/testbed_lanes.sh run HOURS | archive" >&2
    exit 2
    ;;
esac
