#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the tests and for trying `drray submit` without a
# cluster: munged + slurmctld + N slurmd (nodes n1..nN, all on this host), everything (config,
# state, logs, sockets, pid files) in one directory, on ports of its own, so it neither needs nor
# touches /etc/slurm, /run/munge or a system cluster.
#
#   slurm/local-cluster.sh start DIR [--nodes N] [--cpus C] [--mem-mb M]
#   slurm/local-cluster.sh stop DIR
#   slurm/local-cluster.sh status DIR
#
# After `start`, point the SLURM client tools (and drray) at it:  export SLURM_CONF=DIR/slurm.conf
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root (slurmd runs jobs
# as their submitting user). Several slurmd on one host work because each node has its own port
# and spool directory (NodeName=nK NodeHostname=<host> NodeAddr=127.0.0.1 Port=...).
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[ $# -ge 2 ] || usage
action=$1; dir=$2; shift 2
nodes=2; cpus=$(nproc); mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) nodes=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --mem-mb) mem_mb=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "local-cluster: unknown option $1" >&2; usage ;;
    esac
done

need() { command -v "$1" >/dev/null || { echo "local-cluster: $1 not found: apt-get install slurm-wlm munge" >&2; exit 3; }; }

# A free TCP port above 20000 (Ray's worker ports are 10002-19999 by default).
free_port() {
    python3 - "$@" <<'EOF'
import random, socket, sys
taken = {int(p) for p in sys.argv[1:]}
while True:
    port = random.randint(20000, 40000)
    if port in taken:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $(( seconds * 5 ))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "local-cluster: $what did not come up within ${seconds}s; logs in $dir" >&2
    return 1
}

start() {
    need slurmctld; need slurmd; need munged
    dir=$(realpath -m "$dir")
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        echo "local-cluster: already running in $dir (stop it first)" >&2; exit 1
    fi
    mkdir -p "$dir/state" "$dir/munge"
    chmod 700 "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$dir/munge/munge.key"; }
    # a start that fails half-way stops what it started
    trap 'echo "local-cluster: start failed; stopping what was started" >&2; stop >/dev/null 2>&1 || true' ERR
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

    local ctld_port taken host
    ctld_port=$(free_port); taken="$ctld_port"
    host=$(hostname)
    {
        echo "# written by slurm/local-cluster.sh; a test cluster on one host"
        echo "ClusterName=drraylocal"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$ctld_port"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "AuthInfo=socket=$dir/munge/munge.socket"
        echo "CredType=cred/munge"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool-%n"
        echo "SlurmctldPidFile=$dir/slurmctld.pid"
        echo "SlurmdPidFile=$dir/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/slurmctld.log"
        echo "SlurmdLogFile=$dir/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"   # no cgroups in containers; tracks a job's process tree
        echo "TaskPlugin=task/none"
        echo "MpiDefault=none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SchedulerType=sched/backfill"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "KillWait=10"
        echo "MinJobAge=3600"                       # `scontrol show job` knows ended jobs for an hour
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=60"
        echo "InactiveLimit=0"
        echo "Waittime=0"
        local i port
        for i in $(seq 1 "$nodes"); do
            port=$(free_port $taken); taken="$taken $port"
            echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } > "$dir/slurm.conf"

    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    wait_for 30 slurmctld scontrol ping
    for i in $(seq 1 "$nodes"); do
        mkdir -p "$dir/spool-n$i"
        slurmd -f "$SLURM_CONF" -N "n$i"
    done
    wait_for 60 "the $nodes nodes" bash -c "[ \$(sinfo -h -N -t idle -o %N | sort -u | wc -l) -eq $nodes ]"
    trap - ERR
    echo "local SLURM cluster up in $dir: $nodes nodes x $cpus CPUs, partition debug"
    echo "use it with:  export SLURM_CONF=$dir/slurm.conf"
}

stop_pidfile() {  # stop_pidfile FILE: TERM, then KILL after 10 s
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    dir=$(realpath -m "$dir")
    [ -f "$dir/slurm.conf" ] || { echo "local-cluster: no cluster in $dir" >&2; exit 1; }
    # Jobs first (their processes are the slurmds' children), then the daemons, each by its pid
    # file: never `pkill slurmd`, which would take a system cluster's daemons down too.
    SLURM_CONF="$dir/slurm.conf" scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 150); do  # up to 30 s for the jobs (and the Ray they started) to end
        [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h 2>/dev/null)" ] && break
        sleep 0.2
    done
    local f
    for f in "$dir"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    echo "local SLURM cluster in $dir stopped"
}

status() {
    dir=$(realpath -m "$dir")
    [ -f "$dir/slurm.conf" ] || { echo "local-cluster: no cluster in $dir" >&2; exit 1; }
    SLURM_CONF="$dir/slurm.conf" sinfo -N -o "%N %T %c" && SLURM_CONF="$dir/slurm.conf" squeue
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
