#!/usr/bin/env bash
# What the persistent write log costs the VM: fio 4 KiB random writes (QD1 and QD16, 512 MiB)
# through a `coloblk primary` forwarding to a `coloblk secondary` (async mode), with a
# coordinated checkpoint every second, for this build and for BEFORE (a build without the
# write log), interleaved over ROUNDS rounds; prints the median IOPS of each and the ratio.
#
#   BEFORE=/path/to/older/coloblk bench/state-cost.sh [SECONDS] [ROUNDS]   (default 10, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
: "${BEFORE:?set BEFORE to a coloblk binary without the write log}"
cargo build --release -q -p coloblk
AFTER=$PWD/target/release/coloblk
W=$(mktemp -d /tmp/coloblk-state-cost.XXXXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no $1" >&2; exit 1; }

# cell BIN QD -> IOPS
cell() {
    local bin=$1 qd=$2
    rm -rf "$W/c" && mkdir -p "$W/c" && cd "$W/c"
    truncate -s 512M p.raw s.raw
    "$bin" secondary --disk d=s.raw --replica-listen unix:r.sock --export-listen unix:t.sock \
        --control unix:s.qmp --buffer-dir buf --start 2>/dev/null & PIDS+=($!)
    local s=$!
    wait_sock s.qmp
    "$bin" primary --disk d=p.raw,replica="nbd+unix:///d?socket=$W/c/r.sock" \
        --peer-control unix:s.qmp --export-listen unix:p.sock --control unix:p.qmp --start \
        2>/dev/null & PIDS+=($!)
    local p=$!
    wait_sock p.qmp
    # Each build's own ctl: the status fields it waits on changed between builds.
    "$bin" ctl --control unix:p.qmp --timeout 60 wait-protected >/dev/null
    ( while sleep 1; do "$AFTER" ctl --control unix:p.qmp checkpoint >/dev/null 2>&1 || true; done ) &
    local ck=$!
    sync
    fio --name=b --ioengine=nbd --uri="nbd+unix:///d?socket=$W/c/p.sock" --rw=randwrite \
        --bs=4k --iodepth="$qd" --size=512M --time_based --runtime="$SECS" \
        --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
    kill "$ck" 2>/dev/null; wait "$ck" 2>/dev/null || true
    kill "$p" "$s"; wait "$p" "$s" 2>/dev/null || true
    cd - >/dev/null
}

declare -A R
for r in $(seq "$ROUNDS"); do
    for qd in 1 16; do
        for which in before after; do
            bin=$BEFORE; [ $which = after ] && bin=$AFTER
            R[$which$qd]+="$(cell "$bin" "$qd") "
        done
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| 4 KiB random writes | without the write log | with it | ratio |"
echo "|---|---|---|---|"
for qd in 1 16; do
    b=$(echo "${R[before$qd]}" | median); a=$(echo "${R[after$qd]}" | median)
    echo "| QD$qd | $b | $a | $(python3 -c "print(f'{$a/$b:.2f}')") |"
done
echo "(rounds: before QD1 ${R[before1]}/ after ${R[after1]}; before QD16 ${R[before16]}/ after ${R[after16]})"
