#!/usr/bin/env bash
# A/B regression check for CI, in Firecracker's manner: build two revisions of hvbench,
# run the same workloads with each, interleaved A B B A (so slow drift of the machine
# cancels), then `hvbench compare`: exit 1 when a measurement regressed significantly
# (permutation test p < 0.01 AND a change beyond the noise threshold), 0 otherwise.
#
#   ci/ab-check.sh [-r ROUNDS] [-o OUTDIR] BASE_REF NEW_REF [hvbench run options...]
#   ci/ab-check.sh main HEAD --backend kvm -w 'cpu.*' -w 'io.*' --samples 20
#
# Both revisions measure on this machine, one after the other; compare them on the same
# machine only (the records say which).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=4
out=""
while getopts "r:o:" opt; do
    case "$opt" in
        r) rounds="$OPTARG" ;;
        o) out="$OPTARG" ;;
        *) echo "usage: $0 [-r ROUNDS] [-o OUTDIR] BASE_REF NEW_REF [run options...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ "$#" -lt 2 ]; then
    echo "usage: $0 [-r ROUNDS] [-o OUTDIR] BASE_REF NEW_REF [run options...]" >&2
    exit 2
fi
base_ref="$1"
new_ref="$2"
shift 2
run_args=("$@")
if [ "${#run_args[@]}" -eq 0 ]; then
    run_args=(--backend kvm -w 'cpu.*' -w 'io.*')
fi
out="${out:-$(mktemp -d /tmp/hvbench-ab.XXXXXX)}"
mkdir -p "$out"
work="$(mktemp -d /tmp/hvbench-ab-src.XXXXXX)"
cleanup() {
    for side in base new; do
        git worktree remove --force "$work/$side" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

build() {
    local side="$1" ref="$2"
    git worktree add --detach -q "$work/$side" "$ref"
    (cd "$work/$side" && cargo build --release -q -p hvbench)
    echo "$work/$side/target/release/hvbench"
}

echo "ab-check: building $base_ref and $new_ref" >&2
base_bin="$(build base "$base_ref")"
new_bin="$(build new "$new_ref")"

run_side() {
    local bin="$1" dir="$2" rc=0
    # Exit status 3 means some workloads did not succeed: their records say why, and
    # compare reports them; anything else is an error of the run itself.
    "$bin" run "${run_args[@]}" --out "$dir" --append >/dev/null || rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
        echo "ab-check: $bin run failed (exit $rc)" >&2
        exit "$rc"
    fi
}

for ((round = 0; round < rounds; round++)); do
    echo "ab-check: round $((round + 1))/$rounds (A B B A)" >&2
    run_side "$base_bin" "$out/base"
    run_side "$new_bin" "$out/new"
    run_side "$new_bin" "$out/new"
    run_side "$base_bin" "$out/base"
done

echo "ab-check: results in $out/base and $out/new" >&2
exec "$new_bin" compare "$out/base" "$out/new"
