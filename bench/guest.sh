#!/usr/bin/env bash
# In-guest benchmark: the same Linux guest (scripts/build-guest, plus fio and its libraries in an
# appended initramfs) runs the same fio jobs on an ext4 file system on its virtio disk, attached
# in each of these ways, one after the other, in one run:
#
#   file       QEMU's file driver on a raw image (unreplicated: the limit)
#   qemu-nbd   QEMU's NBD client to qemu-nbd (unreplicated, over a unix socket)
#   qemu-colo  QEMU's COLO path: quorum (local raw + replication mode=primary over NBD) to a
#              QEMU 7.2 secondary (replication mode=secondary, its disk exported over NBD)
#   coloblk    QEMU's NBD client to a coloblk primary forwarding to a coloblk secondary
#              (MODE: async by default, as the daemon's default)
#   vhost      the same coloblk pair, the guest attached over vhost-user-blk (when the
#              binary has it: `coloblk primary --help` mentions vhost-user)
#
# Jobs (fio in the guest, on a file in /mnt, O_DIRECT): 1 MiB sequential write and read (QD4,
# libaio), 4 KiB random writes at QD1 (psync) and QD16 (libaio), 4 KiB writes each followed by
# fsync. Images and the overlays live on the host's disk (not a tmpfs); every image starts as
# the same freshly made ext4 file system; the page cache is dropped before each guest.
#
#   bench/guest.sh                 # SECS=5 per job; MODE=async; GUEST_ACCEL as build-guest
#   SECS=10 MODE=sync bench/guest.sh
#   COLOBLK_BIN=path/to/coloblk bench/guest.sh
#   ONLY="file coloblk" bench/guest.sh
#
# Under TCG (no vmx/svm) the guest's own instructions dominate and compress every ratio: the
# script prints which accelerator ran. Needs QEMU 7.2 (scripts/get-qemu-colo), fio on the host
# (its binary and libraries are copied into the guest), qemu-nbd, python3 with qemu.qmp.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
MODE=${MODE:-async}
ONLY=${ONLY:-file qemu-nbd qemu-colo coloblk vhost}
[ -n "${COLOBLK_BIN:-}" ] || cargo build --release -q -p coloblk
BIN=${COLOBLK_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/coloblk}
eval "$(scripts/get-qemu-colo target/qemu-colo)"
eval "$(scripts/build-guest target/guest)"
ACCEL=$(scripts/build-guest --accel)
W=$(mktemp -d "${BENCH_DIR:-/tmp}/coloblk-guestbench.XXXXXX")
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"; }
trap cleanup EXIT
MIB=$((1 << 20))
DISK_MIB=1024

# The guest's extra initramfs: fio with every library it links, and an /init (replacing the
# base one) that mounts /dev/vda and runs the jobs. Appended cpio archives overlay the first.
extra=$W/extra
mkdir -p "$extra"
cp --parents -L /usr/bin/fio "$extra"
# (not through get-qemu-colo's LD_LIBRARY_PATH: the guest has only the system paths)
for lib in $(env -u LD_LIBRARY_PATH ldd /usr/bin/fio | grep -o '/[^ ]*'); do cp --parents -L "$lib" "$extra"; done
cat >"$extra/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "GUEST: \$*" >/dev/console; }
for m in \$(cat /modules/order); do insmod /modules/\$m.ko; done
for _ in \$(seq 100); do [ -b /dev/vda ] && break; sleep 0.05; done
mount -t ext4 /dev/vda /mnt || { say "failed: mount"; poweroff -f; }
job() { # NAME fio-options...
    name=\$1; shift
    out=\$(fio --name=\$name --filename=/mnt/fio.dat --size=256M --direct=1 --time_based \
        --runtime=$SECS --minimal "\$@" 2>&1) || { say "failed: \$name: \$out"; return; }
    say "fio \$out"
}
job prep --rw=write --bs=1M --ioengine=libaio --iodepth=4 --runtime=1
job seqwrite --rw=write --bs=1M --ioengine=libaio --iodepth=4
job seqread --rw=read --bs=1M --ioengine=libaio --iodepth=4
job randwrite-qd1 --rw=randwrite --bs=4k --ioengine=psync
job randwrite-qd16 --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16
job write-fsync --rw=write --bs=4k --ioengine=psync --fsync=1
umount /mnt
say "done"
poweroff -f
EOF
chmod +x "$extra/init"
# A newc cpio archive written by python: the host needs no cpio package.
python3 - "$extra" <<'PY' | gzip -1 >"$W/extra.cpio.gz"
import os, sys
root, out = sys.argv[1], sys.stdout.buffer
def entry(name, st, data):
    name = name.encode() + b"\0"
    fields = [0, st.st_mode if st else 0, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
    out.write(b"\0" * (-(110 + len(name)) % 4) + data + b"\0" * (-len(data) % 4))
for d, dirs, files in os.walk(root):
    for n in sorted(dirs) + sorted(files):
        p = os.path.join(d, n)
        st = os.lstat(p)
        data = open(p, "rb").read() if os.path.isfile(p) else b""
        entry(os.path.relpath(p, root), st, data)
entry("TRAILER!!!", None, b"")
PY
cat "$GUEST_INITRD" "$W/extra.cpio.gz" >"$W/initrd"

truncate -s $((DISK_MIB * MIB)) "$W/template.raw"
mkfs.ext4 -q -F "$W/template.raw"

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
fresh() { # DIR: a clean directory with a copy of the template as disk.raw
    rm -rf "$1"
    mkdir -p "$1"
    cp --sparse=always "$W/template.raw" "$1/disk.raw"
}
qmp() { # SOCKET COMMAND [JSON-ARGS]
    python3 - "$@" <<'PY'
import asyncio, json, sys
from qemu.qmp import QMPClient
async def main(sock, cmd, args):
    q = QMPClient("bench")
    for i in range(400):
        try:
            await q.connect(sock)
            break
        except Exception as e:
            if i == 399:
                raise SystemExit(f"no QMP at {sock}: {e}")
            await asyncio.sleep(0.05)
    await q.execute(cmd, json.loads(args))
    await q.disconnect()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "{}"))
PY
}

# guest NAME QEMU-DISK-ARGS...: boots the guest with those disk arguments (paused until the
# caller's PRE hook ran, then continued), waits for it to power off, prints its fio lines.
guest() {
    local name=$1 mem=(-m 1024)
    shift
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    "$QEMU_COLO" -L "$QEMU_COLO_BIOS" -L "$QEMU_COLO_DATA" -M pc -accel "$ACCEL" -display none \
        -nodefaults -no-reboot -S -qmp "unix:$W/$name.qmp,server=on,wait=off" \
        -kernel "$GUEST_KERNEL" -initrd "$W/initrd" -append "console=ttyS0 quiet panic=-1" \
        -serial "file:$W/$name.console" "${mem[@]}" "$@" >"$W/$name.log" 2>&1 &
    local q=$!
    wait_sock "$W/$name.qmp"
    sleep 0.2
    kill -0 "$q" 2>/dev/null || { echo "$name: QEMU exited: $(cat "$W/$name.log")" >&2; exit 1; }
    ${PRE:-true}
    qmp "$W/$name.qmp" cont
    if ! wait "$q"; then echo "$name: QEMU failed: $(cat "$W/$name.log")" >&2; exit 1; fi
    if grep -q "GUEST: failed" "$W/$name.console"; then
        echo "$name: $(grep "GUEST: failed" "$W/$name.console")" >&2
        exit 1
    fi
    grep -a "GUEST: fio" "$W/$name.console" | sed 's/.*GUEST: fio //' | tr -d '\r' >"$W/$name.fio"
}

run_file() {
    fresh "$W/file"
    guest file -drive "file=$W/file/disk.raw,format=raw,if=virtio,cache=writeback"
}

run_qemu_nbd() {
    fresh "$W/qnbd"
    qemu-nbd -f raw -k "$W/qnbd/nbd.sock" -x vm0 --cache=writeback "$W/qnbd/disk.raw" &
    PIDS+=($!)
    wait_sock "$W/qnbd/nbd.sock"
    guest qemu-nbd -drive "file=nbd+unix:///vm0?socket=$W/qnbd/nbd.sock,format=raw,if=virtio,cache=none"
    kill "${PIDS[-1]}" 2>/dev/null || true
}

run_qemu_colo() {
    local s=$W/qcolo/s p=$W/qcolo/p
    fresh "$s"
    fresh "$p"
    for o in active hidden; do qemu-img create -q -f qcow2 "$s/$o.qcow2" $((DISK_MIB * MIB)); done
    "$QEMU_COLO" -M none -nodefaults -display none -L "$QEMU_COLO_DATA" \
        -qmp "unix:$s/c.qmp,server=on,wait=off" \
        -drive "if=none,id=parent0,driver=raw,file.filename=$s/disk.raw" \
        -drive "if=none,id=childs0,driver=replication,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.filename=$s/active.qcow2,file.backing.driver=qcow2,file.backing.file.filename=$s/hidden.qcow2,file.backing.backing=parent0" \
        >"$s/log" 2>&1 &
    PIDS+=($!)
    wait_sock "$s/c.qmp"
    qmp "$s/c.qmp" nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$s/nbd.sock\"}}}"
    qmp "$s/c.qmp" nbd-server-add '{"device": "parent0", "name": "vm0", "writable": true}'
    qmp "$s/c.qmp" xen-set-replication '{"enable": true, "primary": false}'
    PRE="qmp $W/qemu-colo.qmp xen-set-replication {\"enable\":true,\"primary\":true}" \
        guest qemu-colo -drive "if=virtio,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.driver=raw,children.0.file.filename=$p/disk.raw,children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.server.type=unix,children.1.file.server.path=$s/nbd.sock,children.1.file.export=vm0"
    kill "${PIDS[-1]}" 2>/dev/null || true
}

# A coloblk pair in DIR (secondary then primary, protected); the primary's export is unix
# socket DIR/primary.sock, or EXPORT if given (e.g. vhost-user:DIR/vhost.sock).
coloblk_pair() {
    local d=$1 export=${2:-unix:$1/primary.sock}
    fresh "$d"
    cp --sparse=always "$W/template.raw" "$d/secondary.raw"
    mkdir "$d/buffer"
    "$BIN" secondary --disk "vm0=$d/secondary.raw" --replica-listen "unix:$d/replica.sock" \
        --export-listen "unix:$d/top.sock" --control "unix:$d/s.qmp" --buffer-dir "$d/buffer" \
        --start 2>"$d/s.log" &
    PIDS+=($!)
    wait_sock "$d/s.qmp"
    "$BIN" primary --disk "vm0=$d/disk.raw,replica=nbd+unix:///vm0?socket=$d/replica.sock" \
        --export-listen "$export" --control "unix:$d/p.qmp" --peer-control "unix:$d/s.qmp" \
        --mode "$MODE" --start 2>"$d/p.log" &
    PIDS+=($!)
    wait_sock "$d/p.qmp"
    "$BIN" ctl --control "unix:$d/p.qmp" wait-protected >/dev/null
}

pair_equal() { # DIR: drain, checkpoint, and the two disks must be equal
    "$BIN" ctl --control "unix:$1/p.qmp" checkpoint >/dev/null
    cmp "$1/disk.raw" "$1/secondary.raw" || { echo "$1: the two disks differ" >&2; exit 1; }
    kill "${PIDS[-1]}" "${PIDS[-2]}"
}

run_coloblk() {
    coloblk_pair "$W/cb"
    guest coloblk -drive "file=nbd+unix:///vm0?socket=$W/cb/primary.sock,format=raw,if=virtio,cache=none"
    pair_equal "$W/cb"
}

run_vhost() {
    if ! "$BIN" primary --help | grep -q vhost-user; then
        echo "vhost: this coloblk has no vhost-user export; skipped" >&2
        return
    fi
    coloblk_pair "$W/vu" "vhost-user:$W/vu/vhost.sock"
    guest vhost -object "memory-backend-memfd,id=mem,size=1024M,share=on" \
        -machine memory-backend=mem -chardev "socket,id=c,path=$W/vu/vhost.sock" \
        -device vhost-user-blk-pci,chardev=c,num-queues=2
    pair_equal "$W/vu"
}

echo "accelerator: $ACCEL; $SECS s per job; coloblk mode $MODE; $(nproc) cores"
for what in $ONLY; do
    case $what in
        file) run_file ;;
        qemu-nbd) run_qemu_nbd ;;
        qemu-colo) run_qemu_colo ;;
        coloblk) run_coloblk ;;
        vhost) run_vhost ;;
        *) echo "unknown configuration $what" >&2; exit 1 ;;
    esac
done

# The table: IOPS for 4 KiB jobs, MiB/s for 1 MiB jobs (fio's terse v3 fields, counted from 1:
# read bw KiB/s 7, write bw 48, write IOPS 49).
python3 - "$W" $ONLY <<'PY'
import os, sys
w, names = sys.argv[1], [n for n in sys.argv[2:] if os.path.exists(f"{sys.argv[1]}/{n}.fio")]
res = {}
for n in names:
    for line in open(f"{w}/{n}.fio"):
        f = line.strip().split(";")
        if len(f) < 50:
            continue
        res[(n, f[2])] = f
jobs = [("seqwrite", "1M seq write MiB/s", 48, 1024), ("seqread", "1M seq read MiB/s", 7, 1024),
        ("randwrite-qd1", "4k randwrite QD1 IOPS", 49, 1),
        ("randwrite-qd16", "4k randwrite QD16 IOPS", 49, 1),
        ("write-fsync", "4k write+fsync IOPS", 49, 1)]
print("| job | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
for job, label, field, div in jobs:
    cells = []
    for n in names:
        f = res.get((n, job))
        cells.append(f"{float(f[field - 1]) / div:,.0f}" if f else "-")
    print(f"| {label} | " + " | ".join(cells) + " |")
PY
