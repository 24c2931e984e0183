#!/usr/bin/env bash
# Fuzzes every target for SECONDS each (default 60), one after another, starting from the
# checked-in seeds (corpus/<target>/) and the saved crashers (regressions/<target>/, run
# first when libFuzzer loads its corpus), and fails on the first crash, leak, timeout or
# out-of-memory. New inputs go to a temporary directory, so the checked-in corpus is left
# as it is. CI runs this (.ci/run); run it by hand the same way: fuzz/run-all.sh 60
#
# Needs cargo-fuzz (installed here if `cargo fuzz` is missing) and a C++ compiler for
# libFuzzer; works on the stable toolchain through RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
case $seconds in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== building the instrumented targets"
cargo fuzz build
targets=$(cargo fuzz list)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()
for target in $targets; do
    echo "== fuzzing $target for ${seconds}s"
    corpora=("$work/$target" "corpus/$target")
    if [ -d "regressions/$target" ]; then
        corpora+=("regressions/$target")
    fi
    mkdir -p "$work/$target"
    log=$work/$target.log
    # -timeout: an input running this long is a hang, reported like a crash.
    if ! cargo fuzz run "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -timeout=10 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAILED: $target (the input that failed is in fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1)
    if [ -z "$done_line" ]; then
        tail -n 20 "$log"
        echo "FAILED: $target ended without libFuzzer's DONE line" >&2
        exit 1
    fi
    echo "$done_line"
    summary+=("$target: $done_line")
done

echo "== fuzzing summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
