#!/usr/bin/env bash
# tests/slurm/up.sh - bring up a real single-node SLURM (slurmctld + slurmd + munged) on localhost for
# the `slurm` tests (make test-slurm). Debian/Ubuntu: apt-installs slurm-wlm and munge when missing.
# Idempotent. Usage:  bash up.sh            (state dir: ${SLURM_TEST_DIR:-/tmp/medvlp-slurm})
#                     SLURM_TEST_CLEAN=1 bash up.sh   (wipe job state / queue first)
#                     SLURM_TEST_ACCOUNTING=1 bash up.sh  (also mariadb + slurmdbd, so sacct works)
# Then:               export SLURM_CONF=${SLURM_TEST_DIR:-/tmp/medvlp-slurm}/slurm.conf
# Exit codes: 0 up and node idle; 3 could not start (one reason line on stderr).
set -uo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/medvlp-slurm}"
CONF="$DIR/slurm.conf"
TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
T0=$(date +%s)

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
fail() { echo "slurm-up: FAILED: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || fail "must run as root (SlurmUser=root, munged, apt-get)"

# ---- 1. packages -----------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    pkgs="slurm-wlm munge"
    if ! apt-get install -y -q --no-install-recommends $pkgs >"$DIR.apt.log" 2>&1; then
        apt-get update -q >>"$DIR.apt.log" 2>&1 || fail "apt-get update failed (see $DIR.apt.log)"
        apt-get install -y -q --no-install-recommends $pkgs >>"$DIR.apt.log" 2>&1 \
            || fail "apt-get install $pkgs failed (see $DIR.apt.log)"
    fi
fi

ACCT="${SLURM_TEST_ACCOUNTING:-0}"
if [ "$ACCT" = 1 ] && { ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; }; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurmdbd mariadb-server >>"$DIR.apt.log" 2>&1 \
      || { apt-get update -q >>"$DIR.apt.log" 2>&1; apt-get install -y -q --no-install-recommends slurmdbd mariadb-server >>"$DIR.apt.log" 2>&1; } \
      || fail "apt-get install slurmdbd mariadb-server failed (see $DIR.apt.log)"
fi

mkdir -p "$DIR"/{state,spool,log,run} || fail "cannot create $DIR"

if [ "${SLURM_TEST_CLEAN:-0}" = 1 ]; then
    # fresh cluster: stop our daemons, forget jobs; job ids restart at 1, so the accounting db
    # must go too (else sacct/submitit report stale records for reused job ids)
    for p in slurmd slurmctld slurmdbd mariadb; do
        pid_alive "$DIR/run/$p.pid" && kill "$(cat "$DIR/run/$p.pid")" 2>/dev/null
    done
    for _ in $(seq 100); do
        alive=0; for p in slurmd slurmctld slurmdbd mariadb; do pid_alive "$DIR/run/$p.pid" && alive=1; done
        [ "$alive" = 0 ] && break; sleep 0.2
    done
    rm -rf "$DIR/state"/* "$DIR/spool"/* "$DIR/db" "$DIR"/run/*.pid
fi

# ---- 2. munge --------------------------------------------------------------
MUNGE_SOCK=/run/munge/munge.socket.2
mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge 2>/dev/null
chmod 0755 /run/munge; chmod 0700 /etc/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key >/dev/null 2>&1
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force >"$DIR/log/munged.start" 2>&1 \
        || /usr/sbin/munged --force >>"$DIR/log/munged.start" 2>&1 \
        || fail "munged did not start: $(tail -1 "$DIR/log/munged.start")"
    touch "$DIR/run/munged.started-by-up"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munge credential round-trip fails"
fi

# ---- 2b. optional accounting: private mariadb (TCP 127.0.0.1) + slurmdbd ---
DB_PORT="${SLURM_TEST_DB_PORT:-3307}"; DBD_PORT="${SLURM_TEST_DBD_PORT:-6819}"
if [ "$ACCT" = 1 ]; then
    DBSOCK="$DIR/run/mysqld.sock"
    if [ ! -d "$DIR/db/mysql" ]; then
        mkdir -p "$DIR/db"
        mariadb-install-db --user=root --datadir="$DIR/db" --auth-root-authentication-method=socket \
            >"$DIR/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
    fi
    if ! mariadb --socket="$DBSOCK" -uroot -e 'select 1' >/dev/null 2>&1; then
        ( setsid mariadbd --user=root --datadir="$DIR/db" --socket="$DBSOCK" --port="$DB_PORT" \
            --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.err" \
            --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 & )
        for _ in $(seq 120); do mariadb --socket="$DBSOCK" -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 0.25; done
        mariadb --socket="$DBSOCK" -uroot -e 'select 1' >/dev/null 2>&1 || fail "mariadbd did not start: $(tail -1 "$DIR/log/mariadb.err")"
    fi
    mariadb --socket="$DBSOCK" -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmtest';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || fail "cannot create slurm db user"
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmtest
StorageLoc=slurm_acct_db
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
    chmod 600 "$DIR/slurmdbd.conf"
    if ! pid_alive "$DIR/run/slurmdbd.pid"; then
        # slurmdbd has no -f: it reads slurmdbd.conf from the directory of $SLURM_CONF
        : >"$DIR/log/slurmdbd.log"
        SLURM_CONF="$DIR/slurm.conf" slurmdbd >"$DIR/log/slurmdbd.start" 2>&1 \
            || fail "slurmdbd did not start: $(tail -1 "$DIR/log/slurmdbd.start")"
        for _ in $(seq 120); do grep -q 'started' "$DIR/log/slurmdbd.log" 2>/dev/null && break; sleep 0.25; done
        grep -q 'started' "$DIR/log/slurmdbd.log" || fail "slurmdbd not ready: $(tail -1 "$DIR/log/slurmdbd.log")"
    fi
    ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    if pid_alive "$DIR/run/slurmdbd.pid"; then kill "$(cat "$DIR/run/slurmdbd.pid")"; fi
    ACCT_CONF="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# ---- 3. slurm.conf ---------------------------------------------------------
NODE="$(hostname -s)"
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-6817}"; SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-6818}"
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc alone honours OMP_NUM_THREADS
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
MEM_MB=$(( MEM_MB - MEM_MB / 10 - 256 ))   # a bit less than physical (90 % - 256 MB)
[ "$MEM_MB" -gt 256 ] || MEM_MB=256

NEWCONF="$(cat <<EOF
# generated by medvlp tests/slurm/up.sh - single-node test cluster
ClusterName=medvlp-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( MEM_MB / CPUS ))
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
# a job whose dependency can never be met is cancelled instead of pending forever
DependencyParameters=kill_invalid_depend
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# accounting (none unless SLURM_TEST_ACCOUNTING=1: then sacct works)
$ACCT_CONF
JobCompType=jobcomp/none
# fast turnaround for tests
KillWait=5
MinJobAge=300
InactiveLimit=0
OverTimeLimit=0
SlurmdTimeout=60
SlurmctldTimeout=30
MessageTimeout=10
# partition
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)"

export SLURM_CONF="$CONF"

CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEWCONF" ]; then
    printf '%s\n' "$NEWCONF" >"$CONF"; CHANGED=1
fi
if [ "$CHANGED" = 1 ]; then
    # conf changed: restart slurm daemons (job state is kept)
    for p in slurmd slurmctld; do
        pid_alive "$DIR/run/$p.pid" && kill "$(cat "$DIR/run/$p.pid")" 2>/dev/null
    done
    for _ in $(seq 50); do
        pid_alive "$DIR/run/slurmd.pid" || pid_alive "$DIR/run/slurmctld.pid" || break; sleep 0.2
    done
fi

# ---- 4. daemons ------------------------------------------------------------
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! pid_alive "$DIR/run/slurmctld.pid" && port_busy "$CTLD_PORT"; then
    fail "port $CTLD_PORT already in use (another slurmctld?); stop it or set SLURM_TEST_CTLD_PORT/SLURM_TEST_SLURMD_PORT"
fi
if ! pid_alive "$DIR/run/slurmd.pid" && port_busy "$SLURMD_PORT"; then
    fail "port $SLURMD_PORT already in use (another slurmd?); stop it or set SLURM_TEST_SLURMD_PORT"
fi
if ! pid_alive "$DIR/run/slurmctld.pid"; then
    /usr/sbin/slurmctld -f "$CONF" >"$DIR/log/slurmctld.start" 2>&1 \
        || fail "slurmctld did not start: $(tail -1 "$DIR/log/slurmctld.start") (log: $DIR/log/slurmctld.log)"
fi
if ! pid_alive "$DIR/run/slurmd.pid"; then
    /usr/sbin/slurmd -f "$CONF" -N "$NODE" >"$DIR/log/slurmd.start" 2>&1 \
        || fail "slurmd did not start: $(tail -1 "$DIR/log/slurmd.start") (log: $DIR/log/slurmd.log)"
fi

# daemons fork into the background; give them a moment to write their pid files
for _ in $(seq 50); do pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" && break; sleep 0.1; done
T1=$(date +%s)

# ---- 5. wait for node idle -------------------------------------------------
state=""
while :; do
    if [ $(( $(date +%s) - T1 )) -ge 1 ]; then
        pid_alive "$DIR/run/slurmctld.pid" || fail "slurmctld died: $(grep -E 'error|fatal' "$DIR/log/slurmctld.log" | grep -v pmix | tail -1)"
        pid_alive "$DIR/run/slurmd.pid" || fail "slurmd died: $(grep -E 'error|fatal' "$DIR/log/slurmd.log" | grep -v pmix | tail -1)"
    fi
    state="$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
    esac
    if [ $(( $(date +%s) - T0 )) -ge "$TIMEOUT" ]; then
        fail "node $NODE not idle after ${TIMEOUT}s (state='${state:-no answer}'; logs in $DIR/log)"
    fi
    sleep 0.5
done

echo "slurm-up: node $NODE $state (${CPUS} CPUs, ${MEM_MB} MB) in $(( $(date +%s) - T0 ))s; $(sinfo --version)"
echo "  export SLURM_CONF=$CONF"
echo "  sinfo; sbatch --wrap 'srun hostname'; squeue; bash $(cd "$(dirname "$0")" && pwd)/down.sh"
