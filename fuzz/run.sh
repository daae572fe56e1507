#!/bin/sh
# Runs each target in turn for SECONDS (default 300), one process at a time, starting from the
# checked-in seeds; new inputs go to a scratch corpus so fuzz/corpus stays small. Prints the
# executions of each run (libFuzzer's "Done N runs") and exits non-zero on the first crash.
set -eu
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
targets=${*:-"webhook_json webhook_ndjson url_path timestamps values"}
scratch=${FUZZ_SCRATCH:-${TMPDIR:-/tmp}/cdc-sink-fuzz-corpus}
for t in $targets; do
    mkdir -p "$scratch/$t"
    cargo +nightly fuzz run -a "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 2>&1 | tee "$scratch/$t.log" |
        grep -E '^Done|^stat::number_of_executed_units|SUMMARY|panicked|deadly signal' || true
    if grep -qE 'SUMMARY|deadly signal|panicked' "$scratch/$t.log"; then
        echo "$t: crash, see $scratch/$t.log and fuzz/artifacts/$t" >&2
        exit 1
    fi
done
