#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 600), $FUZZ_JOBS at a time (default
# 2, one per core here), with libFuzzer
# on the nightly toolchain. New inputs go to target/fuzz-corpus/<target>; the seeds in
# fuzz/seeds/<target> are read, never written. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes this script fail.
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(reference hooks config auth durations)
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
cargo +nightly fuzz build -O
run() {
  local t="$1"
  mkdir -p "target/fuzz-corpus/$t"
  nice -n 10 cargo +nightly fuzz run -O "$t" "target/fuzz-corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -max_len=20000 -print_final_stats=1 > "target/fuzz-$t.log" 2>&1
  echo "$t: $(grep -E '^stat::number_of_executed_units' "target/fuzz-$t.log" | awk '{print $2}') runs in ${secs}s, exit 0"
}
status=0
pids=()
for t in "${targets[@]}"; do
  run "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "${FUZZ_JOBS:-2}" ]; then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || { echo "a fuzz target failed: see target/fuzz-*.log and fuzz/artifacts/" >&2; exit 1; }
