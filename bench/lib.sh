# Helpers the fio benchmarks share (sourced). Callers set SECS, SIZE and, optionally, the VM
# array (a taskset prefix for fio).

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# fio_run URI RW BS QD -> "iops MiBps fio-cpu-seconds"
fio_run() {
    "${VM[@]}" fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=$SIZE \
        --time_based --runtime="$SECS" --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; w=j["write"]
print(w["iops"], w["bw_bytes"]/2**20, (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000)'
}
# CPU seconds a process has used so far, and the whole machine's idle seconds.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
idle_secs() { awk -v hz="$(getconf CLK_TCK)" '/^cpu /{print $5 / hz; exit}' /proc/stat; }

# bench_setup NAME: the coloblk binary in BIN (built unless COLOBLK_BIN names another build, an
# earlier commit for a before/after comparison), a work directory W, and PIDS, the processes
# killed (and W removed) on exit.
bench_setup() {
    [ -n "${COLOBLK_BIN:-}" ] || cargo build --release -q -p coloblk
    BIN=${COLOBLK_BIN:-$PWD/target/release/coloblk}
    W=$(mktemp -d "/tmp/coloblk-bench-$1.XXXXXX")
    PIDS=()
    trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
}
