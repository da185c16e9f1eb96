#!/usr/bin/env bash
# Install and start a single-node SLURM cluster on this machine (Debian/Ubuntu, as root):
# munge, slurmctld, slurmd and the client commands, configured from .ci/slurm.conf.
# Idempotent: packages, config and daemons are only (re)done when missing or changed.
# tests/test_slurm.py uses the cluster; `sinfo` shows it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# 1. Packages.
missing=()
for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup_slurm: installing munge and slurm (missing: ${missing[*]})"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q munge slurmctld slurmd slurm-client
fi

# 2. munge: the shared key authenticates slurm daemons and clients to each other.
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mkdir -p /etc/munge
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "setup_slurm: starting munged"
    $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
    $SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
    $SUDO runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null
fi

# 3. slurm.conf for this machine: one node with its CPUs and memory.
node="$(hostname -s)"
hw="$(slurmd -C | head -1)"
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
memory="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
config="$(sed -e "s/@NODE@/$node/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEMORY@/$memory/g" "$here/slurm.conf")"
changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$config" ]; then
    $SUDO mkdir -p /etc/slurm
    printf '%s\n' "$config" | $SUDO tee /etc/slurm/slurm.conf >/dev/null
    changed=1
fi
$SUDO mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

# 4. Daemons (no systemd in containers: start them directly). A changed config restarts them.
pid_of() { [ -s "/run/$1.pid" ] && cat "/run/$1.pid"; }
running() { local pid; pid="$(pid_of "$1")" && [ -d "/proc/$pid" ]; }
if [ "$changed" -eq 1 ]; then
    for daemon in slurmd slurmctld; do
        if running "$daemon"; then
            $SUDO kill "$(pid_of "$daemon")"
            for _ in $(seq 50); do running "$daemon" || break; sleep 0.2; done
        fi
    done
fi
running slurmctld || { echo "setup_slurm: starting slurmctld"; $SUDO slurmctld; }
running slurmd || { echo "setup_slurm: starting slurmd"; $SUDO slurmd; }

# 5. Wait until the node takes jobs.
state=""
for _ in $(seq 60); do
    state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
    case "$state" in
        idle*|mixed*|allocated*|completing*) break ;;
        down*|drain*) $SUDO scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
case "$state" in
    idle*|mixed*|allocated*|completing*) ;;
    *) echo "setup_slurm: node $node is '${state:-unknown}', not ready; see /var/log/slurm/" >&2; exit 1 ;;
esac
srun --time=1 --ntasks=1 true
echo "setup_slurm: SLURM cluster ready (node $node: $cpus CPUs, $memory MB)"
sinfo
