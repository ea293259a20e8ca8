#!/usr/bin/env bash
# The CPU testbed's sweeps (docs/testbed.md) in session-sized pieces: two lanes of one thread each, each lane
# running its sweeps in order, resumed from the archive in docs/results/, for HOURS.
#
#   scripts/testbed_lanes.sh run HOURS      # resume both lanes; after HOURS, stop what still runs; returns then
#   scripts/testbed_lanes.sh archive        # archive every lane sweep's finished runs, judge the study's answers
#                                           # again with other judges, rewrite the results pages
#
# At HOURS the run in progress is stopped, not waited for: a training stage resumes from its last checkpoint
# (every 16 steps in the testbed's configs); an evaluation, a post-stage repair or a Virus upload starts again. Waiting instead for a
# run to fit (`ftguard sweep --stop-after`, judged by the longest run so far) left a lane idle for up to an hour
# at the end of each session.
#
# A lane moves on to its next sweep only when the current one is complete, so the order below is the order in
# which the study's tables fill: lane A calibrates the alignment-stage defenses (which then join the study), then
# looks at a second model; lane B runs the study, the strong attack, the attack suite, the uncalibrated defenses.
# A lane that has finished its own items helps with the other's (lane B holds most of the compute): both take the
# same sweep's runs in order as `--shard 0/1`, which skips a run whose unit the other lane is making instead of
# waiting for it, so two lanes on one sweep make different runs.
# OUT (default runs/sweeps) and UNITS (default runs/units, shared by every sweep) can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

# A lane item is a sweep, SWEEP:A,B for some of its defenses first (`ftguard sweep --defenses`), SWEEP@S,T for
# some of its seeds first (`--seeds`), or both (SWEEP:A,B@S). Lane A: the
# alignment calibration's paper values and likeliest matches, then Gemma-3 (item 7, the papers' settings, not
# waiting on the calibration), two more calibration settings, the attack suite, the rest. RepNoise's α 1 was
# moved up on 2026-12-05: α 0.1 passed the start rule (pre-attack HS 35 against SFT's 30), and its group's choice,
# which decides whether RepNoise joins the study, waits on this one run.
# The attack suite was put before most of the calibration's other settings on 2026-12-05: behind lane B's study
# and strong attack (about 15 single-thread hours), issue 21's worst case would not start for seven sessions.
# Before it, the two settings likeliest to start within ±5 of SFT (Vaccine ρ 2 and Booster λ 1 at 192 steps: at
# 128 steps both start 9–10 above, and 64 more steps took Vaccine ρ 0.5 from 40 to 23); the rest are longer shots.
# Vaccine ρ 2 at 192 steps then started at 25 against SFT's 30 and is the aligned-reference rule's choice so far
# (2026-12-05), so Vaccine's group is finished next (ρ 5 at 128 and 192 steps): its choice decides whether Vaccine
# joins the study (issue 20, item 4), which comes before issue 21's suite.
# Booster λ 1 at 160 steps was put after the suite's first seed on 2026-12-06: 128 and 192 steps bracket SFT's
# start (+9, −7) and the 192-step run is inside every guard after the attack, so this setting, not the suite's
# other seeds, decides whether Booster joins the study (issue 20, which comes first). T-Vaccine ρ 1 was put right
# after it on 2026-12-06 for the same reason: it is T-Vaccine's last setting (ρ 3 starts 40 above SFT), one run
# that decides whether T-Vaccine joins the study, against the suite's two remaining seeds (about 20 machine hours).
LANE_A=(
  testbed-align-calibration:booster-lam5-s128-refresh4,vaccine-rho2-s128,booster-lam1-s128,tvaccine-rho3-s128,repnoise-alpha0.1-s128,repnoise-alpha1-s128
  testbed-gemma3-defenses
  testbed-align-calibration:vaccine-rho2-s192,booster-lam1-s192
  testbed-align-calibration:vaccine-rho5-s128,vaccine-rho5-s192
  cpu-attack-suite@44
  testbed-align-calibration:booster-lam1-s160
  testbed-align-calibration:tvaccine-rho1-s128
  cpu-attack-suite
  testbed-align-calibration
)
# Lane B: the attack suite (issue 21's worst case) before the defenses added after the calibration, which no
# issue's result waits on (moved on 2026-12-05).
# Vaccine joined the study on 2026-12-05 with seed 48 of six defenses still to run: that seed comes first, so
# that those defenses' five-seed rows are complete before Vaccine's five runs (about an hour each) begin.
# On 2026-12-07 the alignment calibration went before the uncalibrated defenses (its last settings decided whether
# Booster joins the study; the added defenses decide no issue). Booster joined that day (λ 5 at 192 steps): its
# runs are testbed-study's last, taken by both lanes before the uncalibrated defenses.
LANE_B=(
  testbed-study:ewc,filter,antidote,safelora,recovery,repnoise
  testbed-study testbed-study-strong cpu-attack-suite testbed-align-calibration testbed-study-uncalibrated
)
OUT=${OUT:-runs/sweeps}
UNITS=${UNITS:-runs/units}
FTGUARD=${FTGUARD:-.venv/bin/ftguard}
PYTHON=${PYTHON:-.venv/bin/python}

lane() {  # lane NAME END_EPOCH ITEM...: run each item until it is complete or the time is up
  local name=$1 end=$2
  shift 2
  for item in "$@"; do
    local spec=$item only=() seeds=()
    if [[ $spec == *@* ]]; then
      seeds=(--seeds "${spec#*@}")
      spec=${spec%%@*}
    fi
    local sweep=${spec%%:*}
    if [[ $spec == *:* ]]; then only=(--defenses "${spec#*:}"); fi
    mkdir -p "$OUT/$sweep"
    # one lane at a time: two `cp -n` into one folder race ("File exists") and would end the lane under set -e
    if [ -d "docs/results/$sweep" ]; then flock "$OUT/.copy.lock" cp -rn "docs/results/$sweep/." "$OUT/$sweep/"; fi
    local left=$((end - $(date +%s)))
    if [ "$left" -le 600 ]; then return 0; fi
    # exit 0: the item is complete (an item already complete only rewrites its report); 124: stopped for time;
    # else a run failed or the item is wrong (said at once: the lane would sit idle for the rest of the session).
    # The lane's later items wait for this one.
    # Sweeps overlap (the attack suite's harmful_mix cells are the study's runs, the uncalibrated table's SFT is
    # the study's): a run another lane sweep has finished under the same config is copied, not made again.
    local reuse=() other folder
    for other in $(sweeps); do
      [ "$other" != "$sweep" ] || continue
      for folder in "$OUT/$other" "docs/results/$other"; do
        if [ -d "$folder/runs" ]; then reuse+=(--reuse "$folder"); fi
      done
    done
    # a probe run ahead of its sweep (docs/results/<sweep>-*-probe: the Virus cells against SFT and the filter)
    for folder in docs/results/"$sweep"-*-probe; do
      if [ -d "$folder/runs" ]; then reuse+=(--reuse "$folder"); fi
    done
    local rc=0
    OMP_NUM_THREADS=1 timeout -k 60 "$left" "$FTGUARD" sweep "sweeps/$sweep" --output-dir "$OUT/$sweep" \
      --units-dir "$UNITS" --shard 0/1 "${only[@]}" "${seeds[@]}" "${reuse[@]}" >>"$OUT/$sweep/lane-$name.log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
      [ "$rc" -eq 124 ] || echo "lane: $item exited $rc, its later items wait; see $OUT/$sweep/lane-$name.log" >&2
      return 0
    fi
  done
}

sweeps() {  # every lane sweep once
  printf '%s\n' "${LANE_A[@]}" "${LANE_B[@]}" | sed 's/[:@].*//' | awk '!seen[$0]++'
}

archive() {
  local sweep
  for sweep in $(sweeps); do
    # sweep.json appears when a run of the sweep's own ends; before that (runs only copied in from another
    # sweep) there is nothing to archive
    [ -f "$OUT/$sweep/sweep.json" ] || continue
    "$FTGUARD" sweep "sweeps/$sweep" --output-dir "$OUT/$sweep" --report >/dev/null || true  # 1: incomplete
    cp "src/ftguard/configs/sweeps/$sweep.yaml" "$OUT/$sweep/sweep.yaml"
    "$PYTHON" scripts/archive_sweep.py "$OUT/$sweep" "docs/results/$sweep"
  done
  # the study's answers judged again (RESULTS.md, section 4): from the archive, the answers from the units store
  local judge
  for judge in ftguard-judge keyword minilm ftguard-cross-judge; do
    rm -rf "$OUT/testbed-study-rescored/$judge"
    # exit 1: some older runs' answers are gone; those runs are left out and listed
    "$FTGUARD" judge rescore docs/results/testbed-study --judge "$judge" --units-dir "$UNITS" \
      --output-dir "$OUT/testbed-study-rescored/$judge" >/dev/null || true
    # refused (and the archive kept) when this units store holds fewer of the answers than the archive scored;
    # the runs the archive lacks (made on this machine) are kept beside it, in added/
    "$PYTHON" scripts/archive_sweep.py "$OUT/testbed-study-rescored/$judge" \
      "docs/results/testbed-study-rescored/$judge" || true
  done
  make results-pages
}

case "${1:-}" in
  run)
    hours=${2:?usage: scripts/testbed_lanes.sh run HOURS}
    end=$(($(date +%s) + $("$PYTHON" -c "print(int(float('$hours') * 3600))")))
    # `timeout` runs each sweep in a process group of its own: stopping this script must stop them too
    trap 'pkill -TERM -P "$$" 2>/dev/null; pkill -TERM -f "ftguard sweep sweeps/.* --output-dir $OUT/" 2>/dev/null' \
      INT TERM
    lane A "$end" "${LANE_A[@]}" "${LANE_B[@]}" &
    lane B "$end" "${LANE_B[@]}" "${LANE_A[@]}" &
    wait
    ;;
  archive) archive ;;
  *)
    echo "usage: scripts/testbed_lanes.sh run HOURS | archive" >&2
    exit 2
    ;;
esac
