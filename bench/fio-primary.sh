#!/usr/bin/env bash
# fio's nbd engine through a `coloblk primary` that forwards every write to a secondary
# (qemu-nbd, and our own `coloblk serve`), in async and sync mode, against the same fio on an
# unreplicated `coloblk serve` export, all in the same run. Prints a Markdown table.
#
#   bench/fio-primary.sh [SECONDS] [shared|pinned] [ROUNDS]   (default 5 s per cell, shared, 3)
#
# Every round runs every cell once, interleaved; the table gives each cell's median over the
# rounds (a single run of the baseline varied by 25% here). Before each cell the page cache is
# written back (`sync`) and an async primary's queue is drained afterwards, so that neither
# the kernel's writeback of earlier cells nor a forwarding backlog takes CPU from the cell
# being measured.
#
# For 4 KiB QD16 it also prints each process's CPU time per write (fio, the VM-side server or
# primary, the secondary), the machine's idle share, and how full an async primary's queue was
# at 80% of the run (full: backpressure held the VM to the forwarding's pace).
#
# shared: every process may run on every core, so the secondary's CPU time is taken from the
#         VM side (here, fio and the primary): the worst case, a secondary on the same host.
# pinned: fio and the primary (or the unreplicated server) on CPU 0, the secondaries on the
#         other cores: the VM side has the same CPU in both columns, as when the secondary runs
#         on its own host, which is where COLO puts it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
LAYOUT=${2:-shared}
ROUNDS=${3:-3}
case $LAYOUT in
shared) VM=(); SEC=() ;;
pinned)
    [ "$(nproc)" -ge 2 ] || { echo "pinned needs two cores" >&2; exit 1; }
    VM=(taskset -c 0); SEC=(taskset -c "1-$(($(nproc) - 1))") ;;
*) echo "layout must be shared or pinned" >&2; exit 1 ;;
esac
SIZE=512M
source bench/lib.sh
bench_setup primary

# Unreplicated baseline.
truncate -s $SIZE "$W/plain.raw"
"${VM[@]}" "$BIN" serve --export d="$W/plain.raw" --listen "unix:$W/plain.sock" 2>/dev/null & PIDS+=($!)
# The VM-side server and the secondary of each cell, for their CPU per write.
declare -A SERVER=([plain]=$!) SECONDARY=([plain]=)
wait_sock "$W/plain.sock"

# start_pair NAME PEER(qemu|ours) MODE: a secondary and a primary forwarding to it.
start_pair() {
    local name=$1 peer=$2 mode=$3
    truncate -s $SIZE "$W/$name-p.raw" "$W/$name-s.raw"
    if [ "$peer" = qemu ]; then
        "${SEC[@]}" qemu-nbd -f raw -t -x d -k "$W/$name-s.sock" "$W/$name-s.raw" 2>/dev/null & PIDS+=($!)
    else
        "${SEC[@]}" "$BIN" serve --export d="$W/$name-s.raw" --listen "unix:$W/$name-s.sock" 2>/dev/null & PIDS+=($!)
    fi
    SECONDARY[$name]=$!
    wait_sock "$W/$name-s.sock"
    "${VM[@]}" "$BIN" primary --disk "d=$W/$name-p.raw,replica=nbd+unix:///d?socket=$W/$name-s.sock$SYNC" --mode "$mode" \
        --export-listen "unix:$W/$name-p.sock" --control "unix:$W/$name-p.qmp" --start 2>/dev/null & PIDS+=($!)
    SERVER[$name]=$!
    wait_sock "$W/$name-p.sock"
}
# Both images start as the same empty file: the primary is told so (binaries that know sync=),
# so no initial sync runs into the first cell.
SYNC=""
"$BIN" primary --help | grep -q 'sync=' && SYNC=",sync=none"
for peer in qemu ours; do for mode in async sync; do start_pair "$peer-$mode" $peer $mode; done; done

ROWS=("4k randwrite QD1|randwrite|4k|1" "4k randwrite QD16|randwrite|4k|16" "1M seqwrite QD16|write|1M|16")
CELLS=(plain qemu-async ours-async qemu-sync ours-sync)
sock() { if [ "$1" = plain ]; then echo "$W/plain.sock"; else echo "$W/$1-p.sock"; fi; }
# Raw results, one line per run: "row cell iops MiBps".
RESULTS=$W/results.txt
for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name rw bs qd <<<"$row"
        for cell in "${CELLS[@]}"; do
            sync
            srv=${SERVER[$cell]} sec=${SECONDARY[$cell]}
            # How full the forwarding queue is near the end of the run (full: the VM is held
            # back to the pace of the forwarding).
            rm -f "$W/queued"
            sampler=
            if [ "$cell" != plain ]; then
                # On the secondaries' cores when pinned: the VM's core is the one measured.
                (sleep "$(awk "BEGIN{print $SECS * 0.8}")"
                    "${SEC[@]}" "$BIN" ctl --control "unix:$W/$cell-p.qmp" status --json |
                        "${SEC[@]}" python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("return", d)["disks"][0]["queue-bytes"])' >"$W/queued") &
                sampler=$!
            fi
            s0=$(cpu_secs "$srv") c0=$([ -n "$sec" ] && cpu_secs "$sec" || echo 0) i0=$(idle_secs)
            read -r iops bw fio_cpu < <(fio_run "nbd+unix:///d?socket=$(sock "$cell")" "$rw" "$bs" "$qd")
            s1=$(cpu_secs "$srv") c1=$([ -n "$sec" ] && cpu_secs "$sec" || echo 0) i1=$(idle_secs)
            [ -z "$sampler" ] || wait "$sampler" || true  # a missed sample is not worth the run
            queued=$(cat "$W/queued" 2>/dev/null || true)
            queued=${queued:-?}
            echo "$name|$cell|$iops|$bw|$fio_cpu|$(awk "BEGIN{print $s1 - $s0}")|$(awk "BEGIN{print $c1 - $c0}")|$(awk "BEGIN{print $i1 - $i0}")|$queued" >>"$RESULTS"
            # An async primary may still hold a queue of forwards: drain it now.
            [ "$cell" = plain ] || "$BIN" ctl --control "unix:$W/$cell-p.qmp" checkpoint >/dev/null
        done
    done
    echo "round $round of $ROUNDS done" >&2
done
python3 - "$RESULTS" "$SECS" "$(nproc)" "${CELLS[@]}" <<'PY'
import statistics, sys
lines = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
secs, ncpu = float(sys.argv[2]), int(sys.argv[3])
cells = sys.argv[4:]
rows = list(dict.fromkeys(l[0] for l in lines))
print("| workload | unreplicated | async -> qemu-nbd | async -> coloblk | sync -> qemu-nbd | sync -> coloblk |")
print("|---|---|---|---|---|---|")
for row in rows:
    seq = row.startswith("1M")
    unit, col = ("MiB/s", 3) if seq else ("IOPS", 2)
    med = {c: statistics.median(float(l[col]) for l in lines if l[0] == row and l[1] == c) for c in cells}
    spread = {c: [float(l[col]) for l in lines if l[0] == row and l[1] == c] for c in cells}
    base = med["plain"]
    out = [f"{base:,.0f} {unit}"]
    for c in cells[1:]:
        out.append(f"{med[c]:,.0f} {unit} ({med[c] / base:.0%})")
    print(f"| {row} | " + " | ".join(out) + " |")
print()
print(f"CPU per write, 4k randwrite QD16 (medians; {secs} s runs; idle is the whole machine's):")
print()
print("| cell | fio | VM-side server | secondary | idle | queue at 80% of the run |")
print("|---|---|---|---|---|---|")
for c in cells:
    runs = [l for l in lines if l[0] == "4k randwrite QD16" and l[1] == c]
    if not runs:
        continue
    us = lambda i: statistics.median(float(l[i]) / (float(l[2]) * secs) * 1e6 for l in runs)
    idle = statistics.median(float(l[7]) / (secs * ncpu) for l in runs)
    sec = f"{us(6):.1f} µs" if c != "plain" else "-"
    mib = lambda q: f"{int(q) / 2**20:.0f}" if q.isdigit() else "?"
    queued = "-" if c == "plain" else " / ".join(mib(l[8]) for l in runs) + " MiB"
    print(f"| {c} | {us(4):.1f} µs | {us(5):.1f} µs | {sec} | {idle:.0%} | {queued} |")
print()
print("Each run (min-max over the rounds):")
for row in rows:
    col = 3 if row.startswith("1M") else 2
    parts = []
    for c in cells:
        v = [float(l[col]) for l in lines if l[0] == row and l[1] == c]
        parts.append(f"{c} {min(v):,.0f}-{max(v):,.0f}")
    print(f"- {row}: " + ", ".join(parts))
PY
# Everything forwarded must have arrived: drain each primary and compare the images.
for cell in qemu-async ours-async qemu-sync ours-sync; do
    "$BIN" ctl --control "unix:$W/$cell-p.qmp" checkpoint >/dev/null
    cmp -s "$W/$cell-p.raw" "$W/$cell-s.raw" && echo "$cell: secondary image identical after drain" ||
        { echo "$cell: IMAGES DIFFER" >&2; exit 1; }
done
echo "($LAYOUT, $ROUNDS rounds of $SECS s per cell, medians, $SIZE raw files on $(df --output=fstype /tmp | tail -1), $(nproc) cores; percentages are of the unreplicated row)"
