#!/usr/bin/env bash
# tests/slurm/down.sh - stop the test SLURM started by tests/slurm/up.sh (slurmd, slurmctld, and munged if up.sh started it).
# Usage: bash down.sh   (SLURM_TEST_DIR as for up.sh; SLURM_TEST_PURGE=1 also deletes the state dir)
set -u
DIR="${SLURM_TEST_DIR:-/tmp/medvlp-slurm}"
export SLURM_CONF="$DIR/slurm.conf"

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# cancel jobs first so that job steps (slurmstepd) go away cleanly
if pid_alive "$DIR/run/slurmctld.pid"; then
    scancel --quiet --partition=debug 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi

stop() {  # stop <pidfile>
    local pf="$1" pid
    pid_alive "$pf" || { rm -f "$pf"; return 0; }
    pid="$(cat "$pf")"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$pf"
}
stop "$DIR/run/slurmd.pid"
stop "$DIR/run/slurmctld.pid"

stop "$DIR/run/slurmdbd.pid"
stop "$DIR/run/mariadb.pid"

if [ -f "$DIR/run/munged.started-by-up" ]; then
    /usr/sbin/munged --stop >/dev/null 2>&1 || { [ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null; }
    for _ in $(seq 50); do pgrep -x munged >/dev/null || break; sleep 0.1; done
    rm -f "$DIR/run/munged.started-by-up"
fi

[ "${SLURM_TEST_PURGE:-0}" = 1 ] && rm -rf "$DIR" "$DIR.apt.log"
left="$(pgrep -a -f -- "-f $DIR/slurm.conf" 2>/dev/null; pgrep -a -f "mariadbd.*--datadir=$DIR/db" 2>/dev/null)"
if [ -n "$left" ]; then echo "slurm-down: still running:" >&2; echo "$left" >&2; exit 1; fi
echo "slurm-down: stopped"
