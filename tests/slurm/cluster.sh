#!/usr/bin/env bash
# A throw-away Slurm cluster on this one machine, for the tests in tests/slurm/.
#
#   tests/slurm/cluster.sh up       install Debian's Slurm + MUNGE (first time), start munged, slurmctld and
#                                   one slurmd per node; prints the SLURM_CONF clients must use
#   tests/slurm/cluster.sh down     cancel jobs, stop every daemon it started, remove its namespaces and links
#   tests/slurm/cluster.sh status
#
# Every node is a slurmd in its own network namespace (address $NET.N on a private bridge) with its own
# hostname (nodeN); files and process ids are shared with this machine, so the repository, its .venv and
# /tmp look the same on every node, and a test can signal any rank's process directly. The controller
# and munged run in this machine's namespace. Nodes advertise 4 GPUs (stand-in device files, no
# hardware) so that the batch scripts' #SBATCH --gpus-per-node requests are scheduled as written; the
# jobs themselves run in CPU mode.
#
# Needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (network and mount namespaces). Nothing listens
# outside the bridge this script creates.
#
# Environment (defaults in brackets):
#   AMI_SLURM_DIR    config, logs, spool, pid files                     [/tmp/ami-slurm]
#   AMI_SLURM_NODES  compute nodes                                      [4]
#   AMI_SLURM_CPUS   CPUs each node advertises (more than exist is OK)  [4]
#   AMI_SLURM_NET    first three octets of the bridge's /24             [10.79.0]
#   AMI_SLURM_PORT   slurmctld port (slurmd uses the next one)          [6917]
set -euo pipefail

DIR=${AMI_SLURM_DIR:-/tmp/ami-slurm}
NODES=${AMI_SLURM_NODES:-4}
CPUS=${AMI_SLURM_CPUS:-4}
NET=${AMI_SLURM_NET:-10.79.0}
PORT=${AMI_SLURM_PORT:-6917}

CONTROLLER=amictl            # the controller's hostname (slurmctld insists it matches SlurmctldHost)
CONTROLLER_IP=$NET.254
BRIDGE=amislurm0
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/socket

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pid_in() { cat "$1" 2>/dev/null || true; }
netns_of() { echo "amislurm-node$1"; }
ctl() { SLURM_CONF=$CONF "$@"; }

install_packages() {
    local missing=() tool
    for tool in slurmctld slurmd sbatch munged nsenter unshare ip; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    # There is no init system in a container; a policy-rc.d that refuses keeps the packages'
    # postinst scripts from trying to start the system-wide daemons.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
    ((added_policy)) && rm -f "$policy"
    return 0
}

write_config() {
    mkdir -p "$DIR"/{etc,log,pid,state} "$DIR/munge"
    local i nodes_expr="node[1-$NODES]"
    ((NODES == 1)) && nodes_expr=node1
    cat >"$CONF" <<EOF
# written by tests/slurm/cluster.sh: an emulated cluster, state in $DIR
ClusterName=amitest
SlurmctldHost=$CONTROLLER($CONTROLLER_IP)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pid/slurmctld.pid
SlurmdPidFile=$DIR/pid/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# Slurm 22.05 has no way to switch cgroups off: track processes by parent id and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# look at pending jobs every 2 s: a requeued job becomes eligible by time, which is no scheduling event
SchedulerParameters=sched_interval=2,bf_interval=2
GresTypes=gpu
# the nodes claim more CPUs than the machine has: trust the config, do not drain them for it
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
EOF
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=node$i NodeAddr=$NET.$i CPUs=$CPUS CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=4000 Gres=gpu:4 State=UNKNOWN"
    done >>"$CONF"
    echo "PartitionName=test Nodes=$nodes_expr Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    # gres/gpu wants device files: four stand-ins with /dev/null's device number
    mkdir -p "$DIR/dev"
    for ((i = 0; i < 4; i++)); do [[ -c $DIR/dev/gpu$i ]] || mknod "$DIR/dev/gpu$i" c 1 3; done
    echo "Name=gpu File=$DIR/dev/gpu[0-3]" >"$DIR/etc/gres.conf"

    # What a node sees as /etc/hosts and /etc/resolv.conf (bind-mounted in its mount namespace): every
    # node by name, also v4-mapped (torch's dual-stack TCPStore looks peers up that way), and a resolver
    # that fails at once instead of waiting for a name server that cannot be reached from the namespace.
    {
        echo "127.0.0.1 localhost"
        echo "$CONTROLLER_IP $CONTROLLER"
        for ((i = 1; i <= NODES; i++)); do echo "$NET.$i node$i"; done
        for ((i = 1; i <= NODES; i++)); do echo "::ffff:$NET.$i node$i"; done
    } >"$DIR/etc/hosts"
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$DIR/etc/resolv.conf"
}

start_munge() {
    alive "$(pid_in "$DIR/munge/pid")" && return 0
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/key ]] || head -c 1024 /dev/urandom >"$DIR/munge/key"
    chmod 600 "$DIR/munge/key"
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/key" --pid-file="$DIR/munge/pid" \
        --log-file="$DIR/munge/log" --seed-file="$DIR/munge/seed" </dev/null
    local _
    for _ in {1..50}; do [[ -S $SOCKET ]] && break; sleep 0.1; done
    munge -S "$SOCKET" -n </dev/null | unmunge -S "$SOCKET" >/dev/null || fail "munge does not work; see $DIR/munge/log"
}

network_up() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || {
        ip link add "$BRIDGE" type bridge
        ip addr add "$CONTROLLER_IP/24" dev "$BRIDGE"
    }
    ip link set "$BRIDGE" up
    local i ns
    for ((i = 1; i <= NODES; i++)); do
        ns=$(netns_of "$i")
        [[ -e /run/netns/$ns ]] || ip netns add "$ns"
        if ! ip link show "amislurm-v$i" >/dev/null 2>&1; then
            ip link add "amislurm-v$i" type veth peer name eth0 netns "$ns"
            ip link set "amislurm-v$i" master "$BRIDGE" up
            ip -n "$ns" addr add "$NET.$i/24" dev eth0
        fi
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
    # With br_netfilter loaded (Docker does that), bridged frames pass iptables' FORWARD chain.
    if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] && command -v iptables >/dev/null; then
        iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null ||
            iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
    fi
}

start_controller() {
    alive "$(pid_in "$DIR/pid/slurmctld.run")" && return 0
    setsid unshare --uts sh -c "hostname $CONTROLLER && exec slurmctld -D -c -f '$CONF'" \
        </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >"$DIR/pid/slurmctld.run"
    local _
    for _ in {1..50}; do ctl scontrol ping >/dev/null 2>&1 && return 0; sleep 0.2; done
    fail "slurmctld does not answer; see $DIR/log/slurmctld.log"
}

start_nodes() {
    local i
    for ((i = 1; i <= NODES; i++)); do
        alive "$(pid_in "$DIR/pid/slurmd-node$i.run")" && continue
        mkdir -p "$DIR/spool/node$i"
        # nsenter rather than `ip netns exec`: the latter remounts /sys, after which slurmd 22.05 finds
        # no cgroup filesystem and refuses to start. The private mount namespace carries the node's
        # /etc/hosts and resolv.conf; the UTS namespace its hostname.
        setsid nsenter --net="/run/netns/$(netns_of "$i")" unshare --uts --mount --propagation private sh -c \
            "mount --bind '$DIR/etc/hosts' /etc/hosts && mount --bind '$DIR/etc/resolv.conf' /etc/resolv.conf \
             && hostname node$i && SLURM_CONF='$CONF' exec slurmd -D -N node$i -f '$CONF'" \
            </dev/null >>"$DIR/log/slurmd-node$i.out" 2>&1 &
        echo $! >"$DIR/pid/slurmd-node$i.run"
    done
    local _ idle
    for _ in {1..120}; do
        idle=$(ctl sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
        ((idle == NODES)) && return 0
        sleep 0.5
    done
    ctl sinfo -N -l >&2 || true
    fail "the nodes did not come up within 60 s; see $DIR/log/"
}

stop_pid() {  # SIGTERM, then SIGKILL after 10 s
    local pid=$1 _
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in {1..50}; do alive "$pid" || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_up() {
    [[ $(id -u) == 0 ]] || fail "must run as root (network and mount namespaces)"
    install_packages
    write_config
    start_munge
    network_up
    start_controller
    start_nodes
    say "up: $NODES nodes idle; clients need SLURM_CONF=$CONF"
    echo "SLURM_CONF=$CONF"
}

cmd_down() {
    local i pid ns
    if [[ -f $CONF ]] && ctl scontrol ping >/dev/null 2>&1; then
        ctl scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
    fi
    for ((i = 1; i <= NODES; i++)); do stop_pid "$(pid_in "$DIR/pid/slurmd-node$i.run")" & done
    stop_pid "$(pid_in "$DIR/pid/slurmctld.run")" &
    wait
    rm -f "$DIR"/pid/*.run
    for ((i = 1; i <= NODES; i++)); do
        ns=$(netns_of "$i")
        if [[ -e /run/netns/$ns ]]; then
            # whatever is still running on the node: job steps whose slurmstepd went with the daemon
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
        ip link del "amislurm-v$i" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if command -v iptables >/dev/null; then
        iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
    fi
    stop_pid "$(pid_in "$DIR/munge/pid")"
    say "down (logs kept in $DIR/log)"
}

cmd_status() {
    local i
    echo "munged    $(alive "$(pid_in "$DIR/munge/pid")" && echo running || echo stopped)"
    echo "slurmctld $(alive "$(pid_in "$DIR/pid/slurmctld.run")" && echo running || echo stopped)"
    for ((i = 1; i <= NODES; i++)); do
        echo "slurmd node$i $(alive "$(pid_in "$DIR/pid/slurmd-node$i.run")" && echo running || echo stopped)"
    done
    if [[ -f $CONF ]] && ctl scontrol ping >/dev/null 2>&1; then ctl sinfo -N; ctl squeue; fi
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
