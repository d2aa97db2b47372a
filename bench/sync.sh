#!/usr/bin/env bash
# Sync and resync figures, each against a peer in the same run:
#
#   1. initial full sync of a 4 GiB disk holding 1 GiB of data: coloblk (sync=full) against
#      nbdcopy of the same image and QEMU 7.2's blockdev-mirror sync=full, all into qemu-nbd;
#   2. checksum sync of two 4 GiB disks, equal and differing in 64 MiB: time, bytes sent, and
#      the time to read both images (the floor);
#   3. resync after a secondary outage of OUTAGE seconds under fio;
#   4. the VM's fio 4 KiB QD16 random writes during a full sync against without.
#
#   bench/sync.sh [OUTAGE_SECONDS]        (default 30; needs fio, nbdcopy, qemu-nbd, python3)
#
# Images live in a temporary directory on the same file system as /tmp; figures go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTAGE=${1:-30}
PARTS=${PARTS:-1234}   # which of the four parts to run
BIN=target/release/coloblk
cargo build --release -q -p coloblk
eval "$(scripts/get-qemu-colo target/qemu-colo)"
W=$(mktemp -d /tmp/coloblk-sync.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
SIZE=$((4 << 30))
MIB=$((1 << 20))

wait_sock() { for _ in $(seq 500); do [ -S "$1" ] && return; sleep 0.02; done; echo "no $1" >&2; exit 1; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
status() { "$BIN" ctl --json --control "unix:$1" status; }
# Waits until the primary behind control socket $1 is protected.
wait_protected() { "$BIN" ctl --timeout 600 --control "unix:$1" wait-protected >/dev/null; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin)['disks'][0]; print($1)"; }

# The primary image: 1 GiB of data in 16 pieces of 64 MiB, 256 MiB apart; the rest holes.
head -c $((64 * MIB)) /dev/urandom >"$W/piece"
truncate -s $SIZE "$W/p.raw"
for i in $(seq 0 15); do
    dd if="$W/piece" of="$W/p.raw" bs=1M seek=$((i * 256)) conv=notrunc status=none
done
sync

qemu_nbd_target() { # NAME: a fresh 4 GiB target served by qemu-nbd on $W/NAME.sock
    rm -f "$W/$1.raw" "$W/$1.sock"
    truncate -s $SIZE "$W/$1.raw"
    qemu-nbd -f raw -t -x d -k "$W/$1.sock" "$W/$1.raw" 2>/dev/null & PIDS+=($!)
    wait_sock "$W/$1.sock"
}

part() { [[ "$PARTS" == *"$1"* ]]; }
if part 1; then
echo "## 1. initial full sync, 4 GiB disk with 1 GiB of data, into qemu-nbd"
qemu_nbd_target t1
sync # the previous writes' writeback must not land inside the timed copy
t=$(now)
"$BIN" primary --disk "d=$W/p.raw,replica=nbd+unix:///d?socket=$W/t1.sock,sync=full" \
    --export-listen "unix:$W/p1.nbd" --control "unix:$W/p1.qmp" --start 2>/dev/null & PIDS+=($!)
P1=$!
wait_sock "$W/p1.qmp"
wait_protected "$W/p1.qmp"
ours=$(since "$t")
sent=$(status "$W/p1.qmp" | field "d['resync']['sent-bytes']")
kill "$P1"; wait "$P1" 2>/dev/null || true
cmp -s "$W/p.raw" "$W/t1.raw" || { echo "coloblk's copy differs" >&2; exit 1; }

qemu_nbd_target t2
sync
t=$(now)
nbdcopy "$W/p.raw" "nbd+unix:///d?socket=$W/t2.sock"
nbdc=$(since "$t")
cmp -s "$W/p.raw" "$W/t2.raw" || { echo "nbdcopy's copy differs" >&2; exit 1; }

qemu_nbd_target t3
cat >"$W/mirror.py" <<'EOF'
import asyncio, sys, time
from qemu.qmp import QMPClient, EventListener
async def main(qmp, src, tgt):
    c = QMPClient("bench"); await c.connect(qmp)
    await c.execute("blockdev-add", {"driver": "raw", "node-name": "src",
        "file": {"driver": "file", "filename": src, "aio": "threads", "cache": {"direct": False}}})
    await c.execute("blockdev-add", {"driver": "nbd", "node-name": "tgt", "export": "d",
        "server": {"type": "unix", "path": tgt}})
    listener = EventListener(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"))
    with c.listen(listener):
        t = time.monotonic()
        await c.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
            "sync": "full"})
        await listener.get()
        print(f"{time.monotonic() - t:.3f}")
    await c.execute("block-job-cancel", {"device": "m"})
    await c.disconnect()
asyncio.run(main(*sys.argv[1:]))
EOF
"$QEMU_COLO" -M none -nodefaults -display none -L "$QEMU_COLO_DATA" \
    -qmp "unix:$W/q.sock,server=on,wait=off" 2>/dev/null & PIDS+=($!)
Q=$!
wait_sock "$W/q.sock"
qemu=$(python3 "$W/mirror.py" "$W/q.sock" "$W/p.raw" "$W/t3.sock")
kill "$Q"; wait "$Q" 2>/dev/null || true
cmp -s "$W/p.raw" "$W/t3.raw" || { echo "QEMU's mirror differs" >&2; exit 1; }
python3 - "$ours" "$nbdc" "$qemu" "$sent" <<'EOF'
import sys
ours, nbdc, qemu, sent = map(float, sys.argv[1:])
gib = 1.0
print(f"| tool | seconds | data MiB/s | vs nbdcopy |")
print(f"|---|---|---|---|")
for name, t in (("coloblk sync=full", ours), ("nbdcopy", nbdc), ("QEMU 7.2 blockdev-mirror sync=full", qemu)):
    print(f"| {name} | {t:.2f} | {1024 * gib / t:.0f} | {nbdc / t * 100:.0f}% |")
print(f"coloblk sent {sent / 2**20:.0f} MiB as data (the rest as write-zeroes)")
EOF

fi

if part 2; then
echo
echo "## 2. checksum sync of two 4 GiB disks (coloblk secondary, --peer-control)"
checksum_run() { # LABEL [PRIMARY_IMAGE SECONDARY_IMAGE]: default p.raw and s.raw
    local pimg=${2:-$W/p.raw} simg=${3:-$W/s.raw}
    rm -f "$W"/c*.sock "$W"/c*.qmp
    "$BIN" secondary --disk "d=$simg" --replica-listen "unix:$W/cr.sock" \
        --export-listen "unix:$W/ct.sock" --control "unix:$W/cs.qmp" --buffer-dir "$W/buf" \
        --start 2>/dev/null & PIDS+=($!)
    local S=$!
    wait_sock "$W/cs.qmp"
    local t
    t=$(now)
    "$BIN" primary --disk "d=$pimg,replica=nbd+unix:///d?socket=$W/cr.sock" \
        --peer-control "unix:$W/cs.qmp" --export-listen "unix:$W/cp.nbd" \
        --control "unix:$W/cp.qmp" --start 2>/dev/null & PIDS+=($!)
    local P=$!
    wait_sock "$W/cp.qmp"
    wait_protected "$W/cp.qmp"
    local secs
    secs=$(since "$t")
    local st
    st=$(status "$W/cp.qmp")
    echo "| $1 | $secs | $(echo "$st" | field "d['compared']['differing-bytes'] >> 20") | $(echo "$st" | field "d['resync']['sent-bytes'] >> 20") |"
    kill "$P" "$S"; wait "$P" "$S" 2>/dev/null || true
    cmp -s "$pimg" "$simg" || { echo "checksum sync left the disks different" >&2; exit 1; }
}
cp --sparse=always "$W/p.raw" "$W/s.raw"
echo "| disks | seconds | differing MiB | sent MiB |"
echo "|---|---|---|---|"
checksum_run "equal"
# 64 MiB different: 64 pieces of 1 MiB spread over the disk, in data and in holes.
for i in $(seq 0 63); do
    dd if=/dev/urandom of="$W/s.raw" bs=1M count=1 seek=$((i * 64 + 3)) conv=notrunc status=none
done
checksum_run "64 MiB differ"
t=$(now)
cat "$W/p.raw" >/dev/null & R1=$!
cat "$W/s.raw" >/dev/null & R2=$!
wait "$R1" "$R2"
echo "reading both images (page cache, two readers): $(since "$t") s"
# Dense: 2 GiB of data on each side, equal; no hole to skip, every byte read and hashed.
for i in $(seq 0 31); do
    dd if="$W/piece" of="$W/pd.raw" bs=1M seek=$((i * 64)) conv=notrunc status=none
done
cp "$W/pd.raw" "$W/sd.raw"
echo "| disks | seconds | differing MiB | sent MiB |"
echo "|---|---|---|---|"
checksum_run "equal, 2 GiB dense" "$W/pd.raw" "$W/sd.raw"
t=$(now)
cat "$W/pd.raw" >/dev/null & R1=$!
cat "$W/sd.raw" >/dev/null & R2=$!
wait "$R1" "$R2"
echo "reading both dense images (page cache, two readers): $(since "$t") s"
rm -f "$W/pd.raw" "$W/sd.raw"

fi

if part 3; then
echo
echo "## 3. resync after a ${OUTAGE} s secondary outage under fio (4 KiB random writes, 2 GiB)"
cp --sparse=always "$W/p.raw" "$W/s.raw"
rm -f "$W"/c*.sock "$W"/c*.qmp
"$BIN" secondary --disk "d=$W/s.raw" --replica-listen "unix:$W/cr.sock" \
    --export-listen "unix:$W/ct.sock" --control "unix:$W/cs.qmp" --buffer-dir "$W/buf" \
    --start 2>/dev/null & PIDS+=($!)
S=$!
wait_sock "$W/cs.qmp"
"$BIN" primary --disk "d=$W/p.raw,replica=nbd+unix:///d?socket=$W/cr.sock" \
    --peer-control "unix:$W/cs.qmp" --export-listen "unix:$W/cp.nbd" \
    --control "unix:$W/cp.qmp" --start 2>/dev/null & PIDS+=($!)
P=$!
wait_sock "$W/cp.qmp"
wait_protected "$W/cp.qmp"
fio --name=vm --ioengine=nbd --uri="nbd+unix:///d?socket=$W/cp.nbd" --rw=randwrite --bs=4k \
    --iodepth=16 --size=2g --time_based --runtime=$((OUTAGE + 20)) --rate_iops=2000 \
    --output="$W/fio3.txt" >/dev/null 2>&1 &
FIO=$!
sleep 5
# A COLO pair checkpoints all the time: the last one before the outage is where both sides
# were equal, in one generation, so the restart is known to be the same disk.
"$BIN" ctl --control "unix:$W/cp.qmp" checkpoint >/dev/null || echo "(the checkpoint before the outage was refused)"
kill -9 "$S"; wait "$S" 2>/dev/null || true
sleep "$OUTAGE"
dirty=$(status "$W/cp.qmp" | field "d['dirty-bytes']")
rm -f "$W"/cr.sock "$W"/ct.sock "$W"/cs.qmp
t=$(now)
"$BIN" secondary --disk "d=$W/s.raw" --replica-listen "unix:$W/cr.sock" \
    --export-listen "unix:$W/ct.sock" --control "unix:$W/cs.qmp" --buffer-dir "$W/buf" \
    --start 2>/dev/null & PIDS+=($!)
S=$!
wait_protected "$W/cp.qmp"
secs=$(since "$t")
st=$(status "$W/cp.qmp")
echo "dirty at the restart $((dirty / MIB)) MiB; protected again after $secs s;" \
    "copied $(echo "$st" | field "d['resync']['done-bytes'] >> 20") MiB (the dirty bitmap: the" \
    "restart is the disk of the last checkpoint), of which" \
    "sent as data $(echo "$st" | field "d['resync']['sent-bytes'] >> 20") MiB" \
    "($(echo "$st" | field "round(d['resync']['sent-bytes'] / max($dirty, 1), 3)")x the dirty bytes)"
wait "$FIO" || true
kill "$P" "$S"; wait "$P" "$S" 2>/dev/null || true

fi

if part 4; then
echo
echo "## 4. the VM's fio (4 KiB random writes, QD16, 10 s) during a full sync against without"
vm_fio() { # URI -> IOPS
    fio --name=vm --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=16 --size=1g \
        --time_based --runtime=10 --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' | # fio's nbd engine says "connected" on stdout first
        python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['write']['iops']))"
}
fresh_pair() { # NAME SYNC: a primary over a copy of p.raw forwarding into a fresh qemu-nbd
    cp --sparse=always "$W/p.raw" "$W/$1-p.raw"
    qemu_nbd_target "$1"
    "$BIN" primary --disk "d=$W/$1-p.raw,replica=nbd+unix:///d?socket=$W/$1.sock,sync=$2" \
        --export-listen "unix:$W/$1-p.nbd" --control "unix:$W/$1-p.qmp" --start 2>/dev/null &
    PIDS+=($!)
    wait_sock "$W/$1-p.nbd"
}
fresh_pair quiet none
base=$(vm_fio "nbd+unix:///d?socket=$W/quiet-p.nbd")
fresh_pair busy full
during=$(vm_fio "nbd+unix:///d?socket=$W/busy-p.nbd")
left=$(status "$W/busy-p.qmp" | field "d['dirty-bytes'] >> 20")
echo "| VM writes | IOPS |"
echo "|---|---|"
echo "| no sync running | $base |"
echo "| during a full sync | $during ($(echo "scale=0; 100 * $during / $base" | bc)%) |"
echo "(the sync had $left MiB left when fio ended)"
fi
