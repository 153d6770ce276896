#!/usr/bin/env bash
# Runs fuzz targets for SECONDS each (default 60), growing the corpus kept in
# fuzz/corpus/<target>/, and prints runs, coverage and corpus size per target.
# Each run is appended to fuzz/ledger.tsv (target, date, wall and CPU seconds,
# runs, coverage, corpus), which the README's fuzzing figures add up.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (all targets when none is named)
# Needs cargo-fuzz (installed if missing); runs on the stable toolchain via RUSTC_BOOTSTRAP.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
ledger=ledger.tsv
[ -f "$ledger" ] || printf 'target\tdate\tcommit\twall_s\tcpu_s\truns\tcov\tcorpus\n' >"$ledger"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# Built first so the CPU time below is the fuzzer's alone.
RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  start=$(date +%s)
  cpu=$(mktemp)
  TIMEFORMAT='%U %S'
  if ! { time RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" --sanitizer none "corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; } 2>"$cpu"; then
    tail -40 "$log"
    echo "$t: FAILED (artifacts in fuzz/artifacts/$t/)"
    exit 1
  fi
  wall=$(( $(date +%s) - start ))
  cpu_s=$(awk '{printf "%d", $1 + $2}' "$cpu")
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
  size=$(ls "corpus/$t" | wc -l)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$(date -u +%FT%TZ)" "$commit" "$wall" "$cpu_s" "$runs" "$cov" "$size" >>"$ledger"
  echo "$t: $runs runs in $wall s ($cpu_s CPU s), coverage $cov, corpus $size inputs"
  rm -f "$log" "$cpu"
done
