#!/usr/bin/env bash
# Failover after checkpoints, coloblk's secondary against QEMU 7.2's in the same run:
#
#   a 4 GiB raw disk full of data, the overlays on the same ext4 file system (coloblk:
#   --buffer-dir; QEMU: qcow2 active and hidden images); replication started; three
#   checkpoints with 0, 64 and 512 MiB dirty before each (half written through the replica
#   export, i.e. copy-before-write into the hidden overlay, half through the top export into the
#   active overlay); then 512 MiB more dirty the same way; then failover, timed from the command
#   until the stage is done (QEMU: its commit nodes have left the graph; coloblk: stage "done").
#   Both secondaries are sent QEMU's commands (xen-set-replication, xen-colo-do-checkpoint) and
#   the two resulting disks must be equal byte for byte.
#
#   The floor: a plain copy of the same 512 MiB (from a file in the page cache, like the
#   overlays) into a copy of the disk, plus fdatasync.
#
#   bench/failover.sh [ROUNDS]      (default 3; needs qemu-io, qemu-img, python3 with qemu.qmp)
#   BEFORE=path/to/older/coloblk bench/failover.sh   # adds a column for another build
#   CHECKPOINTS="" bench/failover.sh                  # the same failover without the checkpoints
#
# Images live in a temporary directory under $BENCH_DIR (default /tmp, which must not be a
# tmpfs for the figure to mean anything); figures go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BIN=${CARGO_TARGET_DIR:-target}/release/coloblk
cargo build --release -q -p coloblk
eval "$(scripts/get-qemu-colo target/qemu-colo)"
W=$(mktemp -d "${BENCH_DIR:-/tmp}/coloblk-failover.XXXXXX")
if [ "$(stat -f -c %T "$W")" = tmpfs ]; then
    echo "$W is on a tmpfs: the figures would not include the file system's costs" >&2
    exit 1
fi
trap 'rm -rf "$W"' EXIT
MIB=$((1 << 20))

# The disk template: 4 GiB of data (a random 64 MiB piece over and over).
head -c $((64 * MIB)) /dev/urandom >"$W/piece"
for i in $(seq 0 63); do cat "$W/piece"; done >"$W/template.raw"
sync

cat >"$W/run.py" <<'EOF'
"""One failover run of one implementation: prints the seconds from command to done."""
import asyncio, os, subprocess, sys, time
from qemu.qmp import QMPClient

MIB = 1 << 20
GIB = 1 << 30
# (MiB dirty before each checkpoint), then the final dirty amount before the failover.
ROUNDS = [int(m) for m in os.environ.get("CHECKPOINTS", "0 64 512").split()]
FINAL = 512


def qemu_io(sock, export, cmd):
    subprocess.run(
        ["qemu-io", "--image-opts",
         f"driver=nbd,server.type=unix,server.path={sock},export={export}", "-c", cmd],
        check=True, stdout=subprocess.DEVNULL)


async def connect(path):
    qmp = QMPClient("bench")
    for _ in range(1000):
        try:
            await qmp.connect(path)
            return qmp
        except Exception:
            await asyncio.sleep(0.02)
    raise SystemExit(f"no QMP at {path}")


async def main(who, w, bin_, qemu, data):
    disk = f"{w}/disk.raw"
    if who == "qemu":
        sock, replica, top = f"{w}/nbd.sock", "vm0", "top"
        for o in ("active", "hidden"):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{w}/{o}.qcow2",
                            str(4 * GIB)], check=True)
        proc = subprocess.Popen(
            [qemu, "-M", "none", "-nodefaults", "-display", "none", "-L", data,
             "-qmp", f"unix:{w}/c.qmp,server=on,wait=off",
             "-drive", f"if=none,id=parent0,driver=raw,file.filename={disk}",
             "-drive", "if=none,id=childs0,driver=replication,mode=secondary,top-id=childs0,"
             f"file.driver=qcow2,file.file.filename={w}/active.qcow2,"
             f"file.backing.driver=qcow2,file.backing.file.filename={w}/hidden.qcow2,"
             "file.backing.backing=parent0"],
            stderr=open(f"{w}/log", "w"))
    else:
        os.mkdir(f"{w}/buffer")
        rsock, sock, replica, top = f"{w}/replica.sock", f"{w}/top.sock", "vm0", "vm0"
        proc = subprocess.Popen(
            [bin_, "secondary", "--disk", f"vm0={disk}", "--replica-listen", f"unix:{rsock}",
             "--export-listen", f"unix:{sock}", "--control", f"unix:{w}/c.qmp",
             "--buffer-dir", f"{w}/buffer"],
            stderr=open(f"{w}/log", "w"))
    try:
        qmp = await connect(f"{w}/c.qmp")
        if who == "qemu":
            await qmp.execute("nbd-server-start",
                              {"addr": {"type": "unix", "data": {"path": sock}}})
            await qmp.execute("nbd-server-add", {"device": "parent0", "name": "vm0",
                                                 "writable": True})
            await qmp.execute("nbd-server-add", {"device": "childs0", "name": "top",
                                                 "writable": True})
            rsock = sock
        await qmp.execute("xen-set-replication", {"enable": True, "primary": False})
        # Replica writes from offset 0 up, top writes from 2 GiB up; each round a new range
        # and a new pattern, so a leak of an earlier round's bytes shows in the comparison.
        at = 0

        def dirty(mib, k):
            nonlocal at
            half = mib // 2 * MIB
            if half:
                qemu_io(rsock, replica, f"write -P {0x10 + k} {at} {half}")
                qemu_io(sock, top, f"write -P {0x20 + k} {2 * GIB + at} {half}")
            at += half

        for k, mib in enumerate(ROUNDS):
            dirty(mib, k)
            await qmp.execute("xen-colo-do-checkpoint")
        dirty(FINAL, len(ROUNDS))
        t = time.monotonic()
        await qmp.execute("xen-set-replication",
                          {"enable": False, "primary": False, "failover": True})
        while True:
            if who == "qemu":
                nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
                done = not any(n["drv"] in ("qcow2", "commit_top", "mirror_top")
                               for n in nodes)
            else:
                st = await qmp.execute("query-replication")
                stage = st["disks"][0]["stage"]
                if stage not in ("failover", "done"):
                    raise SystemExit(f"coloblk: failover ended in {stage}")
                done = stage == "done"
            if done:
                break
            await asyncio.sleep(0.002)
        print(f"{time.monotonic() - t:.3f}")
        await qmp.disconnect()
    finally:
        proc.kill()
        proc.wait()


asyncio.run(main(*sys.argv[1:]))
EOF

# The floor: 512 MiB written to a file (so it sits in the page cache, as the overlays do),
# then copied into the disk in 4 MiB requests and made durable.
floor() {
    cp "$W/template.raw" "$W/floor.raw"
    head -c $((512 * MIB)) /dev/urandom >"$W/src"
    sync
    local t
    t=$(date +%s.%N)
    dd if="$W/src" of="$W/floor.raw" bs=4M seek=256 conv=notrunc,fdatasync status=none
    echo "$(date +%s.%N) - $t" | bc | xargs printf '%.3f\n'
    rm -f "$W/floor.raw" "$W/src"
}

one() { # WHO [BINARY]: a fresh disk and overlays, then the run
    rm -rf "$W/$1"
    mkdir "$W/$1"
    cp "$W/template.raw" "$W/$1/disk.raw"
    sync
    python3 "$W/run.py" "$1" "$W/$1" "${2:-$BIN}" "$QEMU_COLO" "$QEMU_COLO_DATA"
}

export CHECKPOINTS=${CHECKPOINTS-0 64 512}
echo "## failover after checkpoints of [$CHECKPOINTS] MiB dirty, then 512 MiB dirty; seconds"
printf '%-6s %10s %10s %10s %10s %9s %9s\n' round coloblk before qemu copy+sync ours/qemu ours/copy
for r in $(seq "$ROUNDS"); do
    q=$(one qemu)
    o=$(one coloblk)
    cmp "$W/qemu/disk.raw" "$W/coloblk/disk.raw" || { echo "the two disks differ" >&2; exit 1; }
    b=-
    if [ -n "${BEFORE:-}" ]; then
        b=$(one coloblk "$BEFORE")
        cmp "$W/qemu/disk.raw" "$W/coloblk/disk.raw" || { echo "BEFORE's disk differs" >&2; exit 1; }
    fi
    rm -rf "$W/qemu" "$W/coloblk"
    f=$(floor)
    printf '%-6s %10s %10s %10s %10s %9.2f %9.2f\n' "$r" "$o" "$b" "$q" "$f" \
        "$(echo "$o / $q" | bc -l)" "$(echo "$o / $f" | bc -l)"
done
