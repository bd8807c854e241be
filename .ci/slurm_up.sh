#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine, without systemd, for tests/test_slurm.py.
#
# Debian's slurmctld, slurmd, slurm-client and munge (22.05 on bookworm) are installed when missing (needs root and
# apt). The daemons run in the background as root with ProctrackType=proctrack/linuxproc (no cgroups) and no
# accounting database (sacct is unavailable; submitit then reads job results from its pickles). Idempotent: when
# `sinfo` already answers, nothing is done. Exit status 0 when the cluster answers, 1 otherwise; CI treats a failure
# as "no SLURM here" and the SLURM tests are skipped.
set -uo pipefail

log() { echo "[slurm_up] $*"; }

if command -v sinfo >/dev/null && timeout 10 sinfo -h >/dev/null 2>&1; then
  log "SLURM already answers:"; sinfo; exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "not root: cannot install or start SLURM here"; exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge) \
    || { log "apt-get failed"; exit 1; }
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge 2>/dev/null || true

if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  (command -v mungekey >/dev/null && mungekey --create --force) \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi

cat > /etc/slurm/slurm.conf <<CONF
# Written by var-lab .ci/slurm_up.sh: a one-node test cluster.
ClusterName=varlab
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=${HOST} CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

if ! pgrep -x munged >/dev/null; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force || { log "munged failed"; exit 1; }
fi
if ! pgrep -x slurmctld >/dev/null; then
  log "starting slurmctld"
  nohup /usr/sbin/slurmctld -D -i > /var/log/slurm/slurmctld.out 2>&1 &
fi
sleep 2
if ! pgrep -x slurmd >/dev/null; then
  log "starting slurmd"
  nohup /usr/sbin/slurmd -D > /var/log/slurm/slurmd.out 2>&1 &
fi

for _ in $(seq 1 30); do
  if timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    log "SLURM is up:"; sinfo; exit 0
  fi
  sleep 1
  scontrol update nodename="${HOST}" state=resume >/dev/null 2>&1 || true
done
log "SLURM did not come up; logs:"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/slurm/*.out 2>/dev/null
exit 1
