#!/usr/bin/env bash
# Compares `coloblk serve` with `qemu-nbd` through fio's nbd engine on raw files of the same
# size, interleaving the two servers in the same run, and prints a Markdown table with the
# ratio per row plus the peak RSS of `coloblk serve`.
#
#   bench/fio-serve.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds of 5 s per row and server)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
SIZE=512M
# COLOBLK_BIN runs another build (an earlier commit, for a before/after comparison).
[ -n "${COLOBLK_BIN:-}" ] || cargo build --release -q -p coloblk
BIN=${COLOBLK_BIN:-$PWD/target/release/coloblk}
WORK=$(mktemp -d /tmp/coloblk-bench.XXXXXX)
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
PIDS=()
trap cleanup EXIT

for f in coloblk qemu; do head -c $SIZE /dev/urandom >"$WORK/$f.raw"; done
"$BIN" serve --export disk="$WORK/coloblk.raw" --listen "unix:$WORK/coloblk.sock" 2>"$WORK/coloblk.log" &
CPID=$!; PIDS+=($CPID)
qemu-nbd -f raw -t -e 16 -x disk -k "$WORK/qemu.sock" "$WORK/qemu.raw" 2>"$WORK/qemu.log" &
PIDS+=($!)
for s in coloblk qemu; do
    for _ in $(seq 100); do [ -S "$WORK/$s.sock" ] && break; sleep 0.05; done
done

# name rw bs iodepth
ROWS=("4k randwrite QD16|randwrite|4k|16" "4k randread QD16|randread|4k|16"
      "4k randwrite QD1|randwrite|4k|1" "1M seqwrite QD16|write|1M|16")

# fio_run SERVER RW BS QD -> prints "iops MiBps"
fio_run() {
    fio --name=b --ioengine=nbd --uri="nbd+unix:///disk?socket=$WORK/$1.sock" --rw="$2" --bs="$3" \
        --iodepth="$4" --size=$SIZE --time_based --runtime="$SECS" --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' | python3 -c '
import json,sys
j=json.load(sys.stdin)["jobs"][0]
d=j["write"] if j["write"]["io_bytes"] else j["read"]
print(d["iops"], d["bw_bytes"]/2**20)'
}

declare -A SUM_IOPS SUM_BW
for r in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name rw bs qd <<<"$row"
        for s in coloblk qemu; do
            read -r iops bw < <(fio_run "$s" "$rw" "$bs" "$qd")
            SUM_IOPS[$name/$s]=$(python3 -c "print(${SUM_IOPS[$name/$s]:-0}+$iops)")
            SUM_BW[$name/$s]=$(python3 -c "print(${SUM_BW[$name/$s]:-0}+$bw)")
        done
    done
done
RSS=$(awk '/VmHWM/ {print $2/1024}' /proc/$CPID/status)

echo "| workload | coloblk serve | qemu-nbd | ratio |"
echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$row"
    python3 - "$name" "${SUM_IOPS[$name/coloblk]}" "${SUM_IOPS[$name/qemu]}" "${SUM_BW[$name/coloblk]}" "${SUM_BW[$name/qemu]}" "$ROUNDS" <<'PY'
import sys
name, ci, qi, cb, qb, n = sys.argv[1], *map(float, sys.argv[2:7])
if name.startswith("1M"):
    print(f"| {name} | {cb/n:,.0f} MiB/s | {qb/n:,.0f} MiB/s | {cb/qb:.2f}x |")
else:
    print(f"| {name} | {ci/n:,.0f} IOPS | {qi/n:,.0f} IOPS | {ci/qi:.2f}x |")
PY
done
echo
echo "Peak RSS of coloblk serve: ${RSS} MiB ($ROUNDS rounds of ${SECS} s per row and server, $SIZE raw files, $(nproc) cores)"
