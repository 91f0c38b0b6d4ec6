#!/usr/bin/env bash
# Start N local `tuner worker` processes on one study and wait for them.
#
#   studies/launch_workers.sh STUDY.yaml N [STORAGE_URL] [-- TUNER_OPTIONS...]
#
# The storage is the third argument or $TUNER_STORAGE: a PostgreSQL URL such as
# postgresql+psycopg://USER@HOST:5432/DB. Keep the password out of the URL (and so out of `ps`): psycopg reads
# PGPASSWORD or ~/.pgpass. SQLite is refused: it serves one process.
#
# What it does:
#   1. `tuner create` once, so that N workers do not race to create the tables and the study;
#   2. N `tuner worker` processes in the background, worker i with TUNER_WORKER_INDEX=i (with several GPUs and
#      --device auto, worker i takes GPU i mod the GPU count), its output in $LOG_DIR/worker-i.log;
#   3. waits for all of them; Ctrl-C or SIGTERM is passed on to every worker, which records its running trial
#      FAIL, queues it again and exits (130 / 143);
#   4. prints `tuner status`, and exits 0 only if every worker did.
#
# Options after `--` go to `tuner create` and `tuner worker` alike (e.g. --tracking-uri http://host:5000,
# --study-name NAME, --no-tracking). Environment: TUNER (the tuner command, e.g. .venv/bin/tuner; default
# `tuner`), TUNER_DEVICE (workers' --device, default auto), LOG_DIR (default logs).
set -euo pipefail

prog=${0##*/}
TUNER=${TUNER:-tuner}
LOG_DIR=${LOG_DIR:-logs}

say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
    say "error: $*"
    exit 2
}
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}
# The URL with any password replaced by ***, for messages.
masked() { sed -E 's#^([^:/]+://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"; }

positional=()
extra=()
while (($#)); do
    case $1 in
    --)
        shift
        extra=("$@")
        break
        ;;
    -h | --help) usage ;;
    *)
        positional+=("$1")
        shift
        ;;
    esac
done
((${#positional[@]} >= 2 && ${#positional[@]} <= 3)) || usage

study=${positional[0]}
n=${positional[1]}
storage=${positional[2]:-${TUNER_STORAGE:-}}

[[ -f $study ]] || die "study file not found: $study"
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a whole number >= 1, got '$n'"
[[ -n $storage ]] || die "no storage URL: give it as the third argument or set TUNER_STORAGE, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/tuner"
case $storage in
sqlite:*) die "SQLite serves one worker process, and a second one is refused; for $n workers use PostgreSQL, e.g. postgresql+psycopg://USER@HOST:5432/DB" ;;
*) ;;
esac
command -v "$TUNER" >/dev/null || die "tuner command not found: '$TUNER' (set TUNER, e.g. TUNER=.venv/bin/tuner)"

# `tuner status` has no --study-name: look the study up by name when one is given.
status_target=$study
for ((i = 0; i < ${#extra[@]}; i++)); do
    case ${extra[i]} in
    --study-name) status_target=${extra[i + 1]:-$study} ;;
    --study-name=*) status_target=${extra[i]#--study-name=} ;;
    *) ;;
    esac
done

shown=$(masked "$storage")
say "creating study from $study in $shown"
"$TUNER" create "$study" --storage "$storage" ${extra[@]+"${extra[@]}"}

mkdir -p "$LOG_DIR"
# Job control: a script's background jobs otherwise ignore SIGINT, so a forwarded Ctrl-C would be lost; it also
# gives each worker its own process group, so a Ctrl-C at the terminal reaches the workers once, through here.
set -m
pids=()
signalled=""
caught=0
forward() { # forward SIGNAL_RECEIVED SIGNAL_TO_SEND
    caught=1
    signalled=$2
    say "got SIG$1: sending SIG$2 to ${#pids[@]} worker(s); each closes its running trial and exits"
    kill -s "$2" "${pids[@]}" 2>/dev/null || true
}
trap 'forward INT INT' INT
trap 'forward TERM TERM' TERM
trap 'forward HUP TERM' HUP

for ((i = 0; i < n; i++)); do
    [[ -z $signalled ]] || break # stopped while starting: start no more
    TUNER_WORKER_INDEX=$i "$TUNER" worker "$study" --storage "$storage" --device "${TUNER_DEVICE:-auto}" --quiet \
        ${extra[@]+"${extra[@]}"} >"$LOG_DIR/worker-$i.log" 2>&1 &
    pids+=("$!")
    say "worker $i: pid $!, log $LOG_DIR/worker-$i.log"
done

# Wait for one worker, again after a forwarded signal interrupts `wait`; its exit status lands in $rc.
wait_worker() {
    local pid=$1 previous=0
    while :; do
        caught=0
        rc=0
        wait "$pid" || rc=$?
        ((caught)) || break
        previous=$rc
    done
    # The worker ended at the moment a signal came and `wait` had reported it already.
    if ((rc == 127 && previous != 0)); then rc=$previous; fi
}

failed=0
for i in "${!pids[@]}"; do
    wait_worker "${pids[i]}"
    if ((rc == 0)); then
        say "worker $i finished"
    else
        failed=$((failed + 1))
        say "worker $i exited with status $rc; see $LOG_DIR/worker-$i.log"
    fi
done
trap - INT TERM HUP

"$TUNER" status "$status_target" --storage "$storage" || say "warning: tuner status failed"

if ((failed)); then
    say "$failed of ${#pids[@]} worker(s) failed"
    case $signalled in
    INT) exit 130 ;;
    TERM) exit 143 ;;
    *) exit 1 ;;
    esac
fi
say "all $n workers finished"
