#!/usr/bin/env bash
# What TLS costs, all in the same run, interleaved, medians over the rounds:
#
#  1. the replica link with and without TLS: fio's nbd engine through a `coloblk primary` that
#     forwards to a `coloblk serve` secondary over nbd+unix:// or over nbds+unix:// (STARTTLS,
#     client certificates), async and sync; throughput, and CPU seconds of the primary and the
#     secondary per replicated MiB;
#  2. our TLS server against qemu-nbd --tls-creds, plain and TLS, over TCP on localhost, written
#     by bench/nbd-write.py (libnbd; fio's nbd engine cannot present a client certificate: libnbd
#     refuses it the URI's tls-certificates=DIR); throughput and server CPU per MiB.
#
#   [RAW=FILE] bench/tls.sh [SECONDS] [ROUNDS]        (default 5 s per cell, 3 rounds)
#
# The certificates are made with the openssl commands of the README (so they are checked too).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-3}
SIZE=512M
VM=()
source bench/lib.sh
bench_setup tls

# Credentials (README recipe): one CA, one host certificate for both ends.
(
    cd "$W"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=bench CA/O=Example" -keyout ca-key.pem -out ca-cert.pem \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    mkdir creds && cp ca-cert.pem creds/
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost/O=Example" \
        -keyout creds/server-key.pem -out host.csr
    openssl x509 -req -in host.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
        -out creds/server-cert.pem -extfile <(printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth,clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment")
    cp creds/server-cert.pem creds/client-cert.pem
    cp creds/server-key.pem creds/client-key.pem
) 2>/dev/null
CREDS=$W/creds
AUTHZ="CN=localhost,O=Example"

declare -A SERVER SECONDARY URI
# Part 1: start_pair NAME MODE TLS(plain|tls)
start_pair() {
    local name=$1 mode=$2 tls=$3 scheme=nbd creds=()
    truncate -s $SIZE "$W/$name-p.raw" "$W/$name-s.raw"
    if [ "$tls" = tls ]; then scheme=nbds; creds=(--tls-creds "$CREDS"); fi
    "$BIN" serve --export d="$W/$name-s.raw" --listen "unix:$W/$name-s.sock" "${creds[@]}" \
        ${creds:+--tls-authz "$AUTHZ"} 2>/dev/null & PIDS+=($!)
    SECONDARY[$name]=$!
    wait_sock "$W/$name-s.sock"
    "$BIN" primary --disk "d=$W/$name-p.raw,replica=$scheme+unix:///d?socket=$W/$name-s.sock,sync=none" \
        --mode "$mode" --export-listen "unix:$W/$name-p.sock" --control "unix:$W/$name-p.qmp" \
        "${creds[@]}" --start 2>/dev/null & PIDS+=($!)
    SERVER[$name]=$!
    URI[$name]="nbd+unix:///d?socket=$W/$name-p.sock"
    wait_sock "$W/$name-p.sock"
}
for mode in async sync; do for tls in plain tls; do start_pair "$mode-$tls" $mode $tls; done; done

# Part 2: our server and qemu-nbd on TCP, plain and TLS.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; exit 1; }
for s in ours-plain ours-tls qemu-plain qemu-tls; do
    truncate -s $SIZE "$W/$s.raw"
    p=$(port)
    case $s in
    ours-plain) "$BIN" serve --export d="$W/$s.raw" --listen "tcp:127.0.0.1:$p" --insecure 2>/dev/null & ;;
    ours-tls) "$BIN" serve --export d="$W/$s.raw" --listen "tcp:127.0.0.1:$p" --tls-creds "$CREDS" 2>/dev/null & ;;
    qemu-plain) qemu-nbd -f raw -t -e 16 -x d -b 127.0.0.1 -p "$p" "$W/$s.raw" 2>/dev/null & ;;
    qemu-tls) qemu-nbd -f raw -t -e 16 -x d -b 127.0.0.1 -p "$p" \
        --object "tls-creds-x509,id=tls0,dir=$CREDS,endpoint=server,verify-peer=on" --tls-creds tls0 \
        "$W/$s.raw" 2>/dev/null & ;;
    esac
    PIDS+=($!); SERVER[$s]=$!; SECONDARY[$s]=
    case $s in
    *-tls) URI[$s]="nbds://localhost:$p/d?tls-certificates=$CREDS" ;;
    *) URI[$s]="nbd://localhost:$p/d" ;;
    esac
    wait_port "$p"
done

ROWS=("4k randwrite QD16|randwrite|4k|16" "1M seqwrite QD16|write|1M|16")
CELLS=(async-plain async-tls sync-plain sync-tls ours-plain ours-tls qemu-plain qemu-tls)
RESULTS=$W/results.txt
for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name rw bs qd <<<"$row"
        for cell in "${CELLS[@]}"; do
            sync
            srv=${SERVER[$cell]} sec=${SECONDARY[$cell]}
            s0=$(cpu_secs "$srv") c0=$([ -n "$sec" ] && cpu_secs "$sec" || echo 0)
            case $cell in
            ours-* | qemu-*) read -r iops bw _ < <(/usr/bin/python3 bench/nbd-write.py "${URI[$cell]}" "$rw" "$bs" "$qd" "$SECS") ;;
            *) read -r iops bw _ < <(fio_run "${URI[$cell]}" "$rw" "$bs" "$qd") ;;
            esac
            # An async primary may still hold a queue of forwards: drain it before reading the
            # CPU, so that forwarding what fio wrote is counted whether or not it had left yet.
            case $cell in async-*) "$BIN" ctl --control "unix:$W/$cell-p.qmp" checkpoint >/dev/null ;; esac
            s1=$(cpu_secs "$srv") c1=$([ -n "$sec" ] && cpu_secs "$sec" || echo 0)
            echo "$name|$cell|$iops|$bw|$(awk "BEGIN{print $s1 - $s0}")|$(awk "BEGIN{print $c1 - $c0}")|$round" >>"$RESULTS"
        done
    done
    echo "round $round of $ROUNDS done" >&2
done
# RAW=FILE keeps every cell's figures (name|cell|iops|MiB/s|primary s|secondary s|round).
[ -z "${RAW:-}" ] || cp "$RESULTS" "$RAW"
python3 - "$RESULTS" "$SECS" <<'PY'
import statistics, sys
lines = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
secs = float(sys.argv[2])
rows = list(dict.fromkeys(l[0] for l in lines))
def med(row, cell, f):
    return statistics.median(f(l) for l in lines if l[0] == row and l[1] == cell)
def rate(row, cell):
    return med(row, cell, lambda l: float(l[3] if row.startswith("1M") else l[2]))
unit = lambda row: "MiB/s" if row.startswith("1M") else "IOPS"
# CPU seconds per MiB written through the cell (primary + secondary for the replica link).
cpu = lambda row, cell: med(row, cell, lambda l: (float(l[4]) + float(l[5])) / (float(l[3]) * secs)) * 1000
print("Replica link, fio through a coloblk primary to a coloblk serve secondary over unix:")
print()
# The plain and TLS cells of one round run back to back: the median of the per-round ratios
# cancels the machine's drift between rounds, which the ratio of the medians does not.
def per_mib(l):
    return (float(l[4]) + float(l[5])) / (float(l[3]) * secs) * 1000
def paired(row, mode):
    by = {(l[1], l[6]): per_mib(l) for l in lines if l[0] == row}
    rs = [by[(f"{mode}-tls", r)] / by[(f"{mode}-plain", r)] - 1
          for (c, r) in by if c == f"{mode}-plain" and (f"{mode}-tls", r) in by]
    return statistics.median(rs), min(rs), max(rs)
print("| workload | mode | plain | TLS | TLS/plain | CPU ms/MiB plain | CPU ms/MiB TLS | CPU +% | CPU +% per round: median (min..max) |")
print("|---|---|---|---|---|---|---|---|---|")
for row in rows:
    for mode in ("async", "sync"):
        p, t = rate(row, f"{mode}-plain"), rate(row, f"{mode}-tls")
        cp, ct = cpu(row, f"{mode}-plain"), cpu(row, f"{mode}-tls")
        m, lo, hi = paired(row, mode)
        print(f"| {row} | {mode} | {p:,.0f} {unit(row)} | {t:,.0f} {unit(row)} | {t / p:.0%} | {cp:.1f} | {ct:.1f} | {ct / cp - 1:+.0%} | {m:+.0%} ({lo:+.0%}..{hi:+.0%}) |")
print()
print("NBD server over TCP on localhost, bench/nbd-write.py (libnbd, python: the client is the limit at 4 KiB), plain and TLS:")
print()
print("| workload | coloblk serve | coloblk serve TLS | qemu-nbd | qemu-nbd TLS | server CPU ms/MiB: coloblk plain / TLS, qemu-nbd plain / TLS |")
print("|---|---|---|---|---|---|")
for row in rows:
    r = {c: rate(row, c) for c in ("ours-plain", "ours-tls", "qemu-plain", "qemu-tls")}
    c = {k: cpu(row, k) for k in r}
    u = unit(row)
    print(f"| {row} | {r['ours-plain']:,.0f} {u} | {r['ours-tls']:,.0f} {u} | {r['qemu-plain']:,.0f} {u} | {r['qemu-tls']:,.0f} {u} | "
          f"{c['ours-plain']:.1f} / {c['ours-tls']:.1f}, {c['qemu-plain']:.1f} / {c['qemu-tls']:.1f} |")
PY
for cell in async-plain async-tls sync-plain sync-tls; do
    "$BIN" ctl --control "unix:$W/$cell-p.qmp" checkpoint >/dev/null
    cmp -s "$W/$cell-p.raw" "$W/$cell-s.raw" && echo "$cell: secondary image identical after drain" ||
        { echo "$cell: IMAGES DIFFER" >&2; exit 1; }
done
echo "($ROUNDS rounds of $SECS s per cell, medians, $SIZE raw files on $(df --output=fstype /tmp | tail -1), $(nproc) cores)"
