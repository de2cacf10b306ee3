#!/usr/bin/env bash
# A real Slurm on one machine: munged, slurmctld and two slurmd daemons that play the compute nodes
# n1 and n2. For the CPU test suite (CI runs as root on a fresh Debian machine) and for trying the Slurm
# path of `launch` on a laptop or in a container.
#
#   slurm/local-cluster.sh start    install packages if missing, write the config, start the daemons,
#                                   wait until both nodes are idle (idempotent)
#   slurm/local-cluster.sh stop     stop the daemons this script started
#   slurm/local-cluster.sh status   sinfo + which daemons run
#
# Needs root and a Debian-like system (apt-get). No systemd needed: the daemons are started directly.
# It writes only /etc/slurm/slurm.conf, /etc/munge/munge.key (if missing), /etc/hosts (one appended
# line mapping n1 and n2 to 127.0.0.1 so that a rendezvous on "n1" resolves), /var/spool/slurm*,
# /var/log/slurm*, /var/run/slurm* and /run/munge. An existing slurm.conf that this script did not
# write is never overwritten.
set -euo pipefail

MARKER="# Written by scaleforge slurm/local-cluster.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
RUN_DIR=/var/run/slurm
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=6817
HOSTS_LINE="127.0.0.1 n1 n2 $MARKER"
WAIT_S=${SCALEFORGE_SLURM_WAIT_S:-60}

log() { echo "[local-cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"
}

# A daemon that exited but was not reaped (a container's init may not reap) is a zombie: not alive.
pid_alive() {
  [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
  [[ $state != Z ]]
}
pid_from() { [[ -f $1 ]] && cat "$1" 2>/dev/null || true; }

install_packages() {
  local missing=()
  [[ -x /usr/sbin/slurmctld ]] || missing+=(slurmctld)
  [[ -x /usr/sbin/slurmd ]] || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [[ -x /usr/sbin/munged ]] || missing+=(munge)
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]} (apt-get)"
  # Without an init system the packages' postinst scripts start nothing; the daemons are started below.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  return 0
}

write_config() {
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite a real Slurm config"
  fi
  local host cpus mem
  host=$(hostname -s)
  # Each slurmd believes it owns twice the machine's cores: the two "nodes" oversubscribe the real
  # cores 4x, so that several small one-task-per-node jobs (the tests submit three at once) run side
  # by side on a 2-core machine instead of queueing.
  cpus=$((2 * $(nproc)))
  mem=2048 # MB per node; CR_Core does not schedule memory, so this is only what sinfo shows
  mkdir -p "$CONF_DIR"
  cat >"$CONF.tmp" <<EOF
$MARKER (host $host); safe to delete with 'stop'.
ClusterName=scaleforge-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only cred_expire (default 120 s) after the requeue; 10 s keeps the
# preemption tests short and is still ample for a step launch on one machine.
AuthInfo=cred_expire=10
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track job processes by process group, no task binding.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60 s) so a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
# The nodes' real hardware differs from what is declared (two nodes share one machine).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Short timers keep the tests fast: kill stragglers 5 s after SIGTERM, forget finished jobs after 5 min.
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[${PORTS[0]}-${PORTS[1]}] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  CONFIG_CHANGED=0
  if ! cmp -s "$CONF.tmp" "$CONF"; then
    CONFIG_CHANGED=1
  fi
  mv "$CONF.tmp" "$CONF"
  if ! grep -qF "$MARKER" /etc/hosts; then
    echo "$HOSTS_LINE" >>/etc/hosts ||
      die "cannot append '$HOSTS_LINE' to /etc/hosts; jobs resolve their rendezvous host n1 through it"
  fi
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  local key=/etc/munge/munge.key
  if [[ ! -s $key ]]; then
    log "creating $key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of="$key" status=none
  fi
  log "starting munged"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge "$key" /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge && chmod 0400 "$key"
    runuser -u munge -- /usr/sbin/munged
  else
    chmod 0700 /etc/munge && chmod 0400 "$key"
    /usr/sbin/munged --force
  fi
  touch "$RUN_DIR/munged.started-by-scaleforge"
  local i
  for i in $(seq 1 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

start_daemons() {
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
  start_munge
  if ! pid_alive "$(pid_from "$RUN_DIR/slurmctld.pid")"; then
    log "starting slurmctld"
    # -i: ignore state files from an earlier, different configuration instead of refusing to start.
    /usr/sbin/slurmctld -i
  fi
  local n
  for n in "${NODES[@]}"; do
    mkdir -p "$SLURMD_SPOOL/$n"
    if ! pid_alive "$(pid_from "$RUN_DIR/slurmd-$n.pid")"; then
      log "starting slurmd -N $n"
      /usr/sbin/slurmd -N "$n"
    fi
  done
}

nodes_idle() {
  # Both nodes respond and are free (idle) or running our jobs (mixed/allocated).
  local states
  states=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null | sort -u) || return 1
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|mixed|allocated|completing)$" <<<"$states" || return 1
  done
}

cmd_start() {
  need_root
  install_packages
  write_config
  if ((CONFIG_CHANGED)) && pid_alive "$(pid_from "$RUN_DIR/slurmctld.pid")"; then
    log "slurm.conf changed; restarting the daemons"
    cmd_stop
  fi
  start_daemons
  local deadline=$((SECONDS + WAIT_S))
  until nodes_idle; do
    if ((SECONDS > deadline)); then
      sinfo -N -l >&2 || true
      tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-n*.log >&2 || true
      die "nodes n1/n2 not idle after ${WAIT_S}s"
    fi
    # A node left "down" by an earlier stop comes back once its slurmd registers (ReturnToService=2);
    # resume explicitly when it says drained/down with a responding slurmd.
    scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
    sleep 0.5
  done
  log "up: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"
}

stop_pidfile() {
  local name=$1 file=$2 pid
  pid=$(pid_from "$file")
  if pid_alive "$pid"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do
      pid_alive "$pid" || break
      sleep 0.1
    done
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

cmd_stop() {
  need_root
  local n
  # Cancel what is still queued or running so that no job step outlives its slurmd.
  command -v scancel >/dev/null && scancel --full --quiet --partition debug 2>/dev/null || true
  for n in "${NODES[@]}"; do
    stop_pidfile "slurmd $n" "$RUN_DIR/slurmd-$n.pid"
  done
  stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
  if [[ -f $RUN_DIR/munged.started-by-scaleforge ]]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$RUN_DIR/munged.started-by-scaleforge"
  fi
}

cmd_status() {
  local n rc=0
  printf 'slurmctld: %s\n' "$(pid_alive "$(pid_from "$RUN_DIR/slurmctld.pid")" && echo running || echo stopped)"
  for n in "${NODES[@]}"; do
    printf 'slurmd %s: %s\n' "$n" "$(pid_alive "$(pid_from "$RUN_DIR/slurmd-$n.pid")" && echo running || echo stopped)"
  done
  sinfo -N -l 2>&1 || rc=1
  return $rc
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
restart) cmd_stop; cmd_start ;;
*) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
