#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (Debian 12 packages):
# munged + mariadb + slurmdbd + slurmctld + slurmd, with 4 fake GPUs so that
# `--gpus` requests schedule.  No systemd: every daemon runs detached with its
# pid file and log under the state dir.
#
# Idempotent: when the cluster in the state dir is already up and its node is
# idle this only prints the path.  Otherwise it (re)writes the configs, stops
# whatever is left of an earlier bring-up and starts the daemons again.
#
# stdout: exactly one line, the slurm.conf path, so that callers can do
#     export SLURM_CONF="$(bash scripts/slurm/up.sh)"
# everything else goes to stderr.
#
# Environment:
#   TELEPATHY_SLURM_DIR   state dir (default /tmp/telepathy-slurm)
#   TELEPATHY_SLURM_CPUS  CPUs the node advertises (default 8; may exceed the
#                         real count so that small test jobs run side by side)
#   TELEPATHY_SLURM_MEM_MB  memory the node advertises (default 262144; not enforced)
#   TELEPATHY_SLURM_GPUS  fake GPUs on the node (default 8)
#   TELEPATHY_SLURM_DB_PORT mariadb TCP port on 127.0.0.1 (default 3307)
#   TELEPATHY_SLURM_TIMEOUT seconds to wait for the node to become idle (default 120)
set -euo pipefail

STATE="${TELEPATHY_SLURM_DIR:-/tmp/telepathy-slurm}"
CPUS="${TELEPATHY_SLURM_CPUS:-8}"
MEM_MB="${TELEPATHY_SLURM_MEM_MB:-262144}"
GPUS="${TELEPATHY_SLURM_GPUS:-8}"
DB_PORT="${TELEPATHY_SLURM_DB_PORT:-3307}"
WAIT_S="${TELEPATHY_SLURM_TIMEOUT:-120}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF="$STATE/etc/slurm.conf"
NODE="$(hostname -s)"
CLUSTER="telepathy"

log() { echo "[slurm-up] $*" >&2; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (daemons run as SlurmUser=root)"

export SLURM_CONF="$CONF"

node_state() { timeout 5 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1 || true; }

alive() {  # alive <pidfile>
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

all_alive() {
  for d in munged mariadb slurmdbd slurmctld slurmd; do
    alive "$STATE/run/$d.pid" || return 1
  done
}

render() {  # render <template> <dest>
  sed -e "s|@STATE@|$STATE|g" -e "s|@NODE@|$NODE|g" -e "s|@CPUS@|$CPUS|g" \
      -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@GPUS@|$GPUS|g" \
      -e "s|@LAST_GPU@|$((GPUS - 1))|g" -e "s|@CLUSTER@|$CLUSTER|g" "$HERE/templates/$1.in"
}

configs_current() {  # the running daemons were started from exactly these configs
  for f in slurm.conf gres.conf slurmdbd.conf; do
    [ -f "$STATE/etc/$f" ] && [ "$(render "$f")" = "$(cat "$STATE/etc/$f")" ] || return 1
  done
}

# ---------------------------------------------------------------- fast path
if configs_current && command -v sinfo >/dev/null && all_alive; then
  case "$(node_state)" in
    idle|mixed|allocated|completing)
      log "cluster already up ($STATE)"; echo "$CONF"; exit 0 ;;
  esac
fi

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# ---------------------------------------------------------------- clean slate
# A bring-up is a fresh cluster: the controller's saved jobs and the node's spool are dropped.
# Jobs recovered from an earlier bring-up (a copied or rebooted machine, a killed session) have no
# processes left, yet hold the node "allocated" until their time limits pass.
bash "$HERE/down.sh" >&2 || true
rm -rf "$STATE/spool"

mkdir -p "$STATE"/{etc,run,log,spool/ctld,spool/d,gpu,db}
# /etc/hosts must resolve the node name for NodeAddr/SlurmctldHost checks
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts

# fake GPUs: character devices with the NVIDIA major number
for i in $(seq 0 $((GPUS - 1))); do
  [ -c "$STATE/gpu/nvidia$i" ] || { rm -f "$STATE/gpu/nvidia$i"; mknod "$STATE/gpu/nvidia$i" c 195 "$i"; }
done


for f in slurm.conf gres.conf slurmdbd.conf; do render "$f" > "$STATE/etc/$f"; done
chmod 600 "$STATE/etc/slurmdbd.conf"

start() {  # start <name> <cmd...>: detached, logs appended, pid recorded
  local name="$1"; shift
  setsid "$@" </dev/null >>"$STATE/log/$name.log" 2>&1 &
  echo $! > "$STATE/run/$name.pid"
}

wait_for() {  # wait_for <what> <seconds> <cmd...>
  local what="$1" secs="$2"; shift 2
  for _ in $(seq 1 $((secs * 2))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what did not come up within ${secs}s; logs in $STATE/log"
}

# ---------------------------------------------------------------- munge
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
start munged setpriv --reuid=munge --regid=munge --init-groups munged -F --force
wait_for munged 20 bash -c 'munge -n | unmunge'

# ---------------------------------------------------------------- mariadb
DB="$STATE/db"
if [ ! -d "$DB/mysql" ]; then
  log "initialising accounting database in $DB"
  chown mysql:mysql "$DB"
  mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
    >>"$STATE/log/mariadb.log" 2>&1 || die "mariadb-install-db failed; see $STATE/log/mariadb.log"
fi
chown -R mysql:mysql "$DB"; chown mysql:mysql "$STATE/run"
start mariadb mariadbd --user=mysql --datadir="$DB" --socket="$STATE/run/mysqld.sock" \
  --pid-file="$STATE/run/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT"
wait_for mariadb 60 mariadb --socket="$STATE/run/mysqld.sock" -e 'select 1'
mariadb --socket="$STATE/run/mysqld.sock" >&2 <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---------------------------------------------------------------- slurm
# slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
start slurmdbd slurmdbd -D
wait_for slurmdbd 60 sacctmgr -i -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
start slurmctld slurmctld -D -c -i -f "$CONF"
wait_for slurmctld 60 scontrol ping
start slurmd slurmd -D -f "$CONF" -N "$NODE"

for _ in $(seq 1 $((WAIT_S * 2))); do
  st="$(node_state)"
  case "$st" in
    idle) log "node $NODE idle; export SLURM_CONF=$CONF"; echo "$CONF"; exit 0 ;;
    *drain*|*down*|*inval*)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
scontrol show node "$NODE" >&2 || true
die "node $NODE not idle after ${WAIT_S}s (state: $(node_state)); logs in $STATE/log"
