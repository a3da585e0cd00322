#!/usr/bin/env bash
# Bring up a real single-host SLURM cluster for development and tests: 2 virtual nodes
# (node1, node2 on 127.0.0.1, slurmd ports 17001/17002, one `slurmd -N nodeN` each, which Debian's
# MULTIPLE_SLURMD build allows), partition `debug`, no accounting, no systemd. Idempotent: running it
# again leaves a healthy cluster alone. Needs root (apt-get, /etc/hosts, /etc/slurm, munge).
#
#   bash launch/cluster/slurm_up.sh       # then: sinfo; python launch/slurm.py --nodes 2 ...
#   bash launch/cluster/slurm_down.sh     # stop everything and clean the state
#
# Environment: SLURM_CPUS_PER_NODE (default 2), SLURM_MEM_MB (RealMemory per node, default 2048).
set -euo pipefail

NODES=(node1 node2)
CPUS=${SLURM_CPUS_PER_NODE:-2}
MEM=${SLURM_MEM_MB:-2048}
CONF_DIR=/etc/slurm
STATE=/var/lib/slurm-dev
LOGS=/var/log/slurm-dev
say() { echo "slurm_up: $*"; }

if [ "$(id -u)" != 0 ]; then echo "slurm_up: must run as root" >&2; exit 1; fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing slurm-wlm slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
else
  say "packages present ($(slurmctld -V))"
fi

# 2. node names resolve (submitit's hostnames[0] becomes MASTER_ADDR)
for n in "${NODES[@]}"; do
  if ! grep -qE "^[0-9.]+[[:space:]]+([^#]*[[:space:]])?$n([[:space:]]|$)" /etc/hosts; then
    echo "127.0.0.1 $n" >> /etc/hosts
    say "added '127.0.0.1 $n' to /etc/hosts"
  fi
done

# 3. munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  say "created /etc/munge/munge.key"
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge; chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { echo "slurm_up: munged did not start" >&2; exit 1; }
else
  say "munged running"
fi

# 4. slurm.conf (rewritten only when it changes)
mkdir -p "$CONF_DIR" "$STATE/ctld" "$LOGS"
for n in "${NODES[@]}"; do mkdir -p "$STATE/$n"; done
CONF=$(cat <<CONFEOF
# Written by launch/cluster/slurm_up.sh: a single-host development cluster (MULTIPLE_SLURMD).
ClusterName=goembed-dev
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=17001
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=localhost Port=17001 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 NodeHostname=localhost Port=17002 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONFEOF
)
CHANGED=0
if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$CONF" ]; then
  printf '%s\n' "$CONF" > "$CONF_DIR/slurm.conf"
  CHANGED=1
  say "wrote $CONF_DIR/slurm.conf"
fi

# 5. daemons
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$CHANGED" = 1 ]; then  # a new config: restart whatever runs
  for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; say "stopped pid $(cat "$pidfile") for the new config"; fi
  done
  sleep 1
fi
if running "$STATE/slurmctld.pid"; then
  say "slurmctld running (pid $(cat "$STATE/slurmctld.pid"))"
else
  say "starting slurmctld"
  slurmctld -i
fi
for n in "${NODES[@]}"; do
  if running "$STATE/slurmd-$n.pid"; then
    say "slurmd -N $n running (pid $(cat "$STATE/slurmd-$n.pid"))"
  else
    say "starting slurmd -N $n"
    slurmd -N "$n"
  fi
done

# 6. wait for both nodes idle (resume any left down/drained from a previous run)
for i in $(seq 120); do
  states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null || true)
  idle=$(echo "$states" | awk '$2 ~ /^(idle|mix|alloc)/' | wc -l)
  if [ "$idle" -ge "${#NODES[@]}" ]; then
    say "cluster up:"; sinfo -N -p debug
    exit 0
  fi
  if echo "$states" | grep -qE 'down|drain|fail'; then
    scontrol update NodeName=node[1-2] State=RESUME 2>/dev/null || true
  fi
  sleep 0.5
done
echo "slurm_up: the nodes did not become idle in 60 s:" >&2
sinfo -N >&2 || true
tail -n 20 "$LOGS"/*.log >&2 || true
exit 1
