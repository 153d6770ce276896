#!/usr/bin/env bash
# Runs fuzz targets for SECONDS each (default 60), growing the corpus kept in
# fuzz/corpus/<target>/, and prints runs, coverage and corpus size per target.
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
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  start=$(date +%s)
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" --sanitizer none "corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "$t: FAILED (artifacts in fuzz/artifacts/$t/)"
    exit 1
  fi
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
  echo "$t: $runs runs in $(( $(date +%s) - start )) s, coverage $cov, corpus $(ls "corpus/$t" | wc -l) inputs"
  rm -f "$log"
done
