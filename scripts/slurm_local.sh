#!/usr/bin/env bash
# A real single-node Slurm on this machine (slurmctld + slurmd + munge on localhost), for trying the
# sbatch scripts and for the tests. Needs root (the daemons run as root); installs Debian's
# slurm-wlm and munge with apt-get when they are missing.
#
#   bash scripts/slurm_local.sh start [DIR]   start it (idempotent); prints the SLURM_CONF to export
#   bash scripts/slurm_local.sh stop  [DIR]   cancel its jobs and stop the daemons
#   bash scripts/slurm_local.sh status [DIR]  exit 0 when it answers
#
# DIR (default $TITANS_SLURM_DIR, else /tmp/titans_slurm) holds slurm.conf, the munge key and socket,
# state, spool, pid files and the daemons' logs. Every client needs `export SLURM_CONF=DIR/slurm.conf`.
set -euo pipefail

cmd=${1:-}
dir=${2:-${TITANS_SLURM_DIR:-/tmp/titans_slurm}}
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

die() { echo "slurm_local: $*" >&2; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

answers() { alive "$dir/slurmctld.pid" && alive "$dir/slurmd.pid" && timeout 5 sinfo -h >/dev/null 2>&1; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
  echo "slurm_local: installing slurm-wlm and munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >"$dir/apt.log" 2>&1 ||
    { apt-get update -q >>"$dir/apt.log" 2>&1 && apt-get install -y -q slurm-wlm munge >>"$dir/apt.log" 2>&1; } ||
    die "apt-get install slurm-wlm munge failed (see $dir/apt.log)"
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc --all)  # (plain nproc follows OMP_NUM_THREADS)
  [ "$cpus" -ge 2 ] || cpus=2  # room for a 2-task job even on one core (config_overrides below)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  chmod 0755 "$dir" "$dir/munge"
  cat >"$conf.tmp" <<EOF
# Written by scripts/slurm_local.sh: one node (this machine) in one partition.
ClusterName=titans_local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${TITANS_SLURMCTLD_PORT:-6817}
SlurmdPort=${TITANS_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$conf.tmp" "$conf"
  [ -f "$dir/munge/munge.key" ] || mungekey -c -k "$dir/munge/munge.key" >/dev/null
  chmod 0600 "$dir/munge/munge.key"
}

start() {
  mkdir -p "$dir"
  if answers; then
    echo "export SLURM_CONF=$conf"
    return
  fi
  [ "$(id -u)" = 0 ] || die "the local Slurm runs its daemons as root; run this as root"
  install
  stop_daemons
  write_config
  munged -S "$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munge.seed" --force ||
    die "munged did not start (see $dir/munge/munged.log)"
  slurmctld -c -f "$conf" || die "slurmctld did not start (see $dir/slurmctld.log)"
  slurmd -N localhost -f "$conf" || die "slurmd did not start (see $dir/slurmd.log)"
  for _ in $(seq 1 150); do  # up to 30 s for the node to report idle
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
    if [ "$state" = idle ]; then
      echo "export SLURM_CONF=$conf"
      return
    fi
    sleep 0.2
  done
  die "the node did not become idle within 30 s (state '${state:-none}'; see $dir/slurmctld.log and $dir/slurmd.log)"
}

stop_daemons() {
  local pidfile pids=()
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    alive "$pidfile" && pids+=("$(cat "$pidfile")")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

stop() {
  if answers; then  # end the jobs first, so that slurmd reaps their steps
    scancel --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop_daemons
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
