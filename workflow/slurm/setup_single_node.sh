#!/usr/bin/env bash
# Install and start a one-node SLURM cluster (munged, slurmctld, slurmd) on a Debian 12 machine.
# Run as root:  bash workflow/slurm/setup_single_node.sh
#
# Made for machines without systemd (containers, CI): the daemons are started by hand. Safe to
# rerun: it installs only what is missing, starts only the daemons that are not running, and
# leaves a slurm.conf it did not write in place as slurm.conf.bak.<time> before writing its own.
#
# The cluster: one node (this machine) in one partition "main", with the cores and memory it
# has; no accounting daemon, so finished jobs are only visible to squeue for MinJobAge seconds
# (Snakemake's SLURM executor must then use `--slurm-status-command squeue`).
# Overrides: SLURM_CPUS (default: nproc), SLURM_MEM_MB (default: MemTotal in MB),
# SLURM_MIN_JOB_AGE (seconds a finished job stays visible to squeue; default 3600).
set -euo pipefail

die() { echo "error: setup_single_node.sh: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
command -v apt-get >/dev/null || die "expected a Debian machine with apt-get"

HOST="$(hostname -s)"
CPUS="${SLURM_CPUS:-$(nproc)}"
MEM_MB="${SLURM_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)}"
MIN_JOB_AGE="${SLURM_MIN_JOB_AGE:-3600}"
for v in CPUS MEM_MB MIN_JOB_AGE; do  # checked before anything is installed or started
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "SLURM_$v: expected a positive integer, got '${!v}'"
done

# --- 1. packages -------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y slurm-wlm munge
fi

# --- 2. munge (authentication between the SLURM daemons and commands) ------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    # The package normally creates the key; make one if it did not.
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "munged: already running"
else
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
    echo "munged: started"
fi

# --- 3. slurm.conf ---------------------------------------------------------------------------
install -d -m 0755 /etc/slurm
install -d -o slurm -g slurm -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld /var/log/slurm /run/slurm
install -d -m 0755 /var/lib/slurm/slurmd
MARK="# written by workflow/slurm/setup_single_node.sh"
NEW_CONF="$(mktemp)"
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
$MARK
ClusterName=single
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups (containers often lack a writable cgroup tree): track processes by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No accounting daemon; finished jobs stay visible to squeue for MinJobAge seconds instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=$MIN_JOB_AGE
SchedulerType=sched/backfill
# Cores and memory are consumable, so jobs run side by side up to the node's size.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A node that was down (e.g. after a reboot) comes back by itself once slurmd registers.
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
CONF_CHANGED=0
if [ -f /etc/slurm/slurm.conf ] && cmp -s "$NEW_CONF" /etc/slurm/slurm.conf; then
    echo "slurm.conf: unchanged"
else
    if [ -f /etc/slurm/slurm.conf ] && ! head -n 1 /etc/slurm/slurm.conf | grep -qxF "$MARK"; then
        BACKUP="/etc/slurm/slurm.conf.bak.$(date +%Y%m%d%H%M%S)"
        cp -p /etc/slurm/slurm.conf "$BACKUP"
        echo "slurm.conf: kept the existing one as $BACKUP"
    fi
    install -m 0644 "$NEW_CONF" /etc/slurm/slurm.conf
    CONF_CHANGED=1
    echo "slurm.conf: written (node $HOST, CPUs=$CPUS, RealMemory=$MEM_MB MB)"
fi

# --- 4. slurmctld and slurmd ----------------------------------------------------------------
ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
if ctld_up; then
    echo "slurmctld: already running"
    if [ "$CONF_CHANGED" -eq 1 ]; then
        # Node sizes are read at start; a changed node line needs a restart of both daemons.
        echo "slurmctld: slurm.conf changed; rereading it (restart slurmctld and slurmd if the node line changed)"
        scontrol reconfigure
    fi
else
    slurmctld
    for _ in $(seq 30); do ctld_up && break; sleep 0.5; done
    ctld_up || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
    echo "slurmctld: started"
fi
# The pid file names a running slurmd (procps/pgrep is not on a minimal Debian).
slurmd_up() {
    local pid
    pid="$(cat /run/slurm/slurmd.pid 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ]
}
if slurmd_up; then
    echo "slurmd: already running"
else
    slurmd
    echo "slurmd: started"
fi

# --- 5. wait for the node to take jobs ------------------------------------------------------
state=""
for _ in $(seq 60); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)"
    case "$state" in idle|mixed|allocated|completing) break ;; esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *)  # Down or drained from an earlier life of this machine: put it back in service.
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
        sleep 2
        state="$(sinfo -h -n "$HOST" -o %T | head -n 1)"
        case "$state" in
            idle|mixed|allocated|completing) ;;
            *) die "node $HOST is '$state', not idle (see /var/log/slurm/slurmd.log and sinfo -R)" ;;
        esac ;;
esac
sinfo
echo "SLURM is up: one node ($HOST, $CPUS CPUs, $MEM_MB MB) in partition main"
