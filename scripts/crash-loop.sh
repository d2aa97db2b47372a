#!/usr/bin/env bash
# Kills a daemon with -9 at random moments, again and again, and checks after each restart that
# the pair recovers by itself and ends with byte-equal disks.
#
#   scripts/crash-loop.sh primary|secondary|merge [ITERATIONS] [SEED]   (default 100)
#
# primary:   kill -9 the primary under fio, during a checkpoint, or during the resync that
#            follows its previous restart; restart it on the same disk; wait until protected;
#            checkpoint; the two images must be equal, and fio must find the data it wrote and
#            verified at the start (the first 16 MiB, never written again) unchanged.
# secondary: the same, killing the secondary; its load is fio with verify (written, then read
#            back through the primary), which must finish without an error.
# merge:     kill -9 the secondary during a failover merge, after a VM write into the view
#            while it merges (most of the time): its restart resumes the merge, and the disk
#            ends as the view at failover plus that write, byte for byte; never served
#            half-merged.
# Prints one line per iteration and a summary; exits 1 at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
WHO=${1:?primary, secondary or merge}
N=${2:-100}
RANDOM=${3:-$$}
BIN=${COLOBLK_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/coloblk}
[ -n "${COLOBLK_BIN:-}" ] || cargo build --release -q -p coloblk
[ -x "$BIN" ] || { echo "crash-loop: no coloblk binary at $BIN" >&2; exit 1; }
W=$(mktemp -d /tmp/coloblk-crash.XXXXXX)
PIDS=()
cleanup() { kill -9 "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"; echo "work dir $W" >&2; }
trap cleanup EXIT
cd "$W"
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.025; done; echo "no $1" >&2; return 1; }
ms() { sleep "$(printf '0.%03d' $((RANDOM % 1000)))"; }
ctl() { "$BIN" ctl --timeout 60 --command-timeout 60 --control "unix:$1" "${@:2}"; }

start_secondary() {
    rm -f r.sock t.sock s.qmp
    "$BIN" secondary --disk d=s.raw --replica-listen unix:r.sock --export-listen unix:t.sock \
        --control unix:s.qmp --buffer-dir buf --start 2>>s.log & S=$!; PIDS+=($S)
    wait_sock s.qmp
}
start_primary() {
    rm -f p.sock p.qmp
    "$BIN" primary --disk "d=p.raw,replica=nbd+unix:///d?socket=$W/r.sock" \
        --peer-control unix:s.qmp --export-listen unix:p.sock --control unix:p.qmp --start \
        2>>p.log & P=$!; PIDS+=($P)
    wait_sock p.qmp
}
# The first 16 MiB hold data fio wrote and verified once at the start ("kept"); every later
# write goes above it, so after each recovery fio can verify the kept data again.
KEPT=(--name=kept --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16 --offset=0 --size=16M
    --verify=crc32c --verify_fatal=1 --randseed=7)
kept() { # write|verify URI: write and verify the kept data, or only verify it
    local mode=(--do_verify=1)
    [ "$1" = verify ] && mode=(--verify_only)
    fio "${KEPT[@]}" "${mode[@]}" --uri="$2" >kept.log 2>&1 ||
        { echo "iteration ${i:-0}: fio found the kept data changed ($2):" >&2; grep -m5 verify kept.log >&2; exit 1; }
}
load() { # fio random writes above the kept data until killed (or its server dies); for a
    # secondary's kill, a verified run instead: written, then read back through the primary
    if [ "$WHO" = secondary ]; then
        fio --name=l --ioengine=nbd --uri="nbd+unix:///d?socket=$W/p.sock" --rw=randwrite \
            --bs=4k --iodepth=16 --offset=16M --size=48M --verify=crc32c --verify_fatal=1 \
            --randseed=$RANDOM >verify.log 2>&1 & F=$!
    else
        fio --name=l --ioengine=nbd --uri="nbd+unix:///d?socket=$W/p.sock" --rw=randwrite \
            --bs=4k,64k --iodepth=16 --offset=16M --size=$((${SIZE%M} - 16))M --time_based \
            --runtime=30 --randseed=$RANDOM >/dev/null 2>&1 & F=$!
    fi
}
stop_load() { # the random writes end; a secondary's verified run must finish without an error
    if [ "$WHO" = secondary ]; then
        wait "$F" || { echo "iteration $i: fio's verified writes failed while the secondary was killed:" >&2; tail -5 verify.log >&2; exit 1; }
    else
        kill "$F" 2>/dev/null || true; wait "$F" 2>/dev/null || true
    fi
}
check_equal() {
    # As an orchestrator does: a checkpoint refused (the primary may notice the lost link only
    # now) is retried once the pair is protected again; a refusal is never a false "done".
    local tries=0
    until ctl p.qmp wait-protected >/dev/null && ctl p.qmp checkpoint >/dev/null 2>ck.err; do
        tries=$((tries + 1))
        [ $tries -lt 20 ] || { echo "iteration $1: no checkpoint after 20 tries:" >&2; cat ck.err >&2; exit 1; }
        sleep 0.5
    done
    cmp -s p.raw s.raw || { echo "iteration $1: the disks differ after recovery" >&2; cmp p.raw s.raw | head -1 >&2; exit 1; }
    kept verify "nbd+unix:///d?socket=$W/p.sock"
}

SIZE=64M; [ "$WHO" = merge ] && SIZE=512M
truncate -s $SIZE p.raw s.raw
start_secondary
start_primary
ctl p.qmp wait-protected >/dev/null
[ "$WHO" = merge ] || kept write "nbd+unix:///d?socket=$W/p.sock"
moments=(load checkpoint resync)
for i in $(seq "$N"); do
    if [ "$WHO" = merge ]; then
        load; ms; kill "$F" 2>/dev/null || true; wait "$F" 2>/dev/null || true
        ctl p.qmp checkpoint >/dev/null
        # The speculative VM's writes since the checkpoint: 448 MiB to merge; what a finished
        # merge must leave is the view as it is now.
        qemu-io -f raw -c "write -P $((i % 250 + 1)) 0 448M" "nbd+unix:///d?socket=$W/t.sock" >/dev/null
        nbdcopy "nbd+unix:///d?socket=$W/t.sock" view.raw
        kill -9 "$P"; wait "$P" 2>/dev/null || true
        ctl s.qmp failover >/dev/null 2>&1 & C=$!
        # Kill as soon as the merge runs (or at once, a tenth of the time); most of the time, a
        # VM write first, into the view while it merges: acknowledged, it must survive.
        if [ $((RANDOM % 10)) != 0 ]; then
            for _ in $(seq 200); do
                ctl s.qmp --json status 2>/dev/null | grep -q '"stage": "\(failover\|done\)"' && break
            done
            if [ $((RANDOM % 4)) != 0 ]; then
                at=$((RANDOM % 500))M
                qemu-io -f raw -c "write -P 0xf1 $at 1M" "nbd+unix:///d?socket=$W/t.sock" >/dev/null 2>&1 &&
                    qemu-io -f raw -c "write -P 0xf1 $at 1M" view.raw >/dev/null
            fi
        fi
        kill -9 "$S"; wait "$S" 2>/dev/null || true; wait "$C" 2>/dev/null || true
        rm -f r.sock t.sock s.qmp
        if "$BIN" secondary --disk d=s.raw --replica-listen unix:r.sock --export-listen unix:t.sock \
            --control unix:s.qmp --buffer-dir buf --start 2>err.log & S=$!; then PIDS+=($S); fi
        wait_sock s.qmp 2>/dev/null || true
        if kill -0 "$S" 2>/dev/null; then
            st=$(ctl s.qmp --json status)
            stage=$(grep -o '"stage": "[a-z-]*"' <<<"$st" | head -1)
            resumed=$(grep -c '"resumed": true' <<<"$st" || true)
            # A resumed merge runs to its end (then the disk is plain: its state says so).
            for _ in $(seq 400); do
                grep -q '"merging": true' s.raw.coloblk/state || break
                sleep 0.05
            done
            kill "$S"; wait "$S" 2>/dev/null || true
            if grep -q '"promoted-from": "' s.raw.coloblk/state; then
                # Failed over: whether the merge had finished or was resumed, the disk is the
                # view at failover plus the VM's acknowledged writes, byte for byte.
                grep -q '"merging": false' s.raw.coloblk/state || { echo "iteration $i: the merge's end is not recorded" >&2; exit 1; }
                [ ! -e s.raw.coloblk/merge ] || { echo "iteration $i: the merge record outlived the merge" >&2; exit 1; }
                cmp -s s.raw view.raw || { echo "iteration $i: the disk is not the view the VM was promised ($stage)" >&2; cmp s.raw view.raw | head -1 >&2; exit 1; }
                if [ "$resumed" != 0 ]; then outcome="resumed the merge (the disk is the view with the VM's writes)"
                else outcome="merged before the kill (the disk is the view)"; fi
            else
                # Killed before the failover began: still the primary's copy.
                cmp -s s.raw p.raw || { echo "iteration $i: killed before failover, the disk is not the primary's" >&2; exit 1; }
                outcome="killed before the merge began (the disk is the primary's)"
            fi
        else
            # Only when the kill came between recording "merging" and writing the merge
            # record: the disk is refused, never served.
            grep -q "half-merged" err.log || { echo "iteration $i: restart neither served a merged disk nor refused a half-merged one:" >&2; cat err.log >&2; exit 1; }
            outcome="refused as half-merged (killed before the merge record was written)"
        fi
        echo "$outcome" >>outcomes
        # A new pair for the next iteration.
        rm -rf s.raw.coloblk p.raw.coloblk buf view.raw; cp p.raw s.raw
        start_secondary; start_primary; ctl p.qmp wait-protected >/dev/null
        echo "iteration $i: killed during the failover merge: $outcome"
        continue
    fi
    moment=${moments[$((RANDOM % 3))]}
    case $moment in
    load) load; ms ;;
    checkpoint) load; ms; ctl p.qmp checkpoint >/dev/null 2>&1 & C=$!; sleep "0.00$((RANDOM % 10))" ;;
    resync) # kill once under load, restart, and kill again while the restart resyncs
        load; ms
        if [ "$WHO" = primary ]; then kill -9 "$P"; wait "$P" 2>/dev/null || true; start_primary
        else kill -9 "$S"; wait "$S" 2>/dev/null || true; start_secondary; fi
        sleep "0.0$((RANDOM % 10))" ;;
    esac
    if [ "$WHO" = primary ]; then kill -9 "$P"; wait "$P" 2>/dev/null || true
    else kill -9 "$S"; wait "$S" 2>/dev/null || true; fi
    [ "$moment" = checkpoint ] && { wait "$C" 2>/dev/null || true; }
    if [ "$WHO" = primary ]; then stop_load; start_primary; else start_secondary; stop_load; fi
    # Half the time, more writes while the pair heals.
    if [ $((RANDOM % 2)) = 0 ]; then load; ms; stop_load; fi
    check_equal "$i"
    echo "iteration $i: $WHO killed during $moment: recovered, disks equal"
done
[ -e outcomes ] && sort outcomes | uniq -c
echo "$N iterations of kill -9 of the $WHO: every one recovered"
