#!/bin/bash
# A real two-node Slurm cluster on one machine, for hvdtrain's tests (root, Debian's slurm-wlm + munge).
#
#   cluster.sh up STATE_DIR     munged + slurmctld (root network namespace) + one slurmd per node, each in
#                               its own network, mount and UTS namespace on a private bridge; waits for idle
#   cluster.sh down STATE_DIR   kills everything and removes namespaces, links and mounts
#
# Clients: `source STATE_DIR/env`, then sbatch/squeue/sinfo/scontrol. Only addresses of the test's own
# /24 are used. Each slurmd gets its own PMIx client directory (a tmpfs at /run/pmixcli inside its mount
# namespace), or both nodes would collide on /tmp/spmix_appdir_*.
set -u
command=${1:-}
state=$(realpath -m "${2:?usage: cluster.sh up|down STATE_DIR}")
net=${HVDTEST_NET:-10.77.0}
tag=${HVDTEST_TAG:-hvdt}
nodes=${HVDTEST_NODES:-"h1 h2"}
cpus=${HVDTEST_CPUS:-2}
munge_dir=/run/$tag-munge   # munged wants every parent of its socket world-executable: not under pytest's tmp
bridge=${tag}br0
controller_ip=$net.1
controller_host=$(hostname -s)

node_ip() { local i=0 n; for n in $nodes; do i=$((i + 1)); [ "$n" = "$1" ] && echo "$net.$((10 + i))"; done; }
log() { echo "[cluster.sh] $*" >&2; }

running() {  # a live, non-zombie process
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ]
}

stop_pidfile() {  # stop_pidfile FILE COMM SIGNAL: signal the daemon (and its children) if it is COMM
    local file=$1 comm=$2 sig=$3 pid children
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
        children=$(pgrep -P "$pid")
        kill -"$sig" "$pid" $children 2>/dev/null
        for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
        kill -KILL "$pid" $children 2>/dev/null
    fi
    rm -f "$file"
}

down() {
    local n ns pids
    for n in $nodes; do
        ns=$tag-$n
        if ip netns pids "$ns" >/dev/null 2>&1; then
            # slurmd, slurmstepd and every job process of the node live in its namespace
            for _ in $(seq 50); do
                pids=$(ip netns pids "$ns")
                [ -z "$pids" ] && break
                kill -KILL $pids 2>/dev/null
                sleep 0.1
            done
            ip netns del "$ns"
        fi
        rm -rf "/etc/netns/$ns"
        ip link del "${tag}v$n" 2>/dev/null
    done
    stop_pidfile "$state/run/slurmctld.pid" slurmctld KILL
    stop_pidfile "$munge_dir/munged.pid" munged TERM
    rm -rf "$munge_dir"
    ip link del "$bridge" 2>/dev/null
    rmdir /etc/netns 2>/dev/null
    true
}

write_config() {
    local n nodelist=""
    rm -rf "$state/ctld" "$state/spool" "$state/log"
    mkdir -p "$state"/{etc,log,run,ctld,spool} "$munge_dir"
    for n in $nodes; do
        nodelist=${nodelist:+$nodelist,}$n
        mkdir -p "$state/spool/$n"
    done
    {
        cat <<CONF
ClusterName=hvdtest
SlurmctldHost=$controller_host($controller_ip)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job starts cred_expire seconds later (default 120)
AuthInfo=socket=$munge_dir/munge.socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdSpoolDir=$state/spool/%n
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=5
MinJobAge=300
JobRequeue=1
NodeName=DEFAULT CPUs=$cpus RealMemory=1000 State=UNKNOWN
CONF
        for n in $nodes; do echo "NodeName=$n NodeAddr=$(node_ip "$n") NodeHostname=$n"; done
        echo "PartitionName=test Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP"
    } > "$state/etc/slurm.conf"
    # An explicit cgroup plugin: slurmd then starts in a namespace whose /sys has no cgroup mounts.
    printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n' \
        > "$state/etc/cgroup.conf"
    echo "PMIxCliTmpDirBase=/run/pmixcli" > "$state/etc/mpi.conf"
    cat > "$state/env" <<ENV
export SLURM_CONF=$state/etc/slurm.conf
export OMPI_MCA_btl_tcp_if_include=$net.0/24
export OMPI_MCA_oob_tcp_if_include=$net.0/24
ENV
}

up() {
    local n m ns veth
    down
    write_config
    export SLURM_CONF=$state/etc/slurm.conf

    chown munge:munge "$munge_dir"
    chmod 0755 "$munge_dir"
    runuser -u munge -- mungekey -c -k "$munge_dir/munge.key" || return 1
    runuser -u munge -- munged --socket="$munge_dir/munge.socket" --pid-file="$munge_dir/munged.pid" \
        --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" \
        --key-file="$munge_dir/munge.key" || { log "munged failed"; return 1; }

    ip link add "$bridge" type bridge || return 1
    ip addr add "$controller_ip/24" dev "$bridge"
    ip link set "$bridge" up
    for n in $nodes; do
        ns=$tag-$n
        veth=${tag}v$n
        # ip netns exec bind-mounts /etc/netns/NS/* over /etc: node names resolve inside the nodes,
        # and DNS fails fast locally instead of leaving the machine.
        mkdir -p "/etc/netns/$ns"
        { echo "127.0.0.1 localhost"; echo "$controller_ip $controller_host"
          for m in $nodes; do echo "$(node_ip "$m") $m"; done; } > "/etc/netns/$ns/hosts"
        echo "nameserver 127.0.0.1" > "/etc/netns/$ns/resolv.conf"
        ip netns add "$ns" || return 1
        ip link add "$veth" type veth peer name "${veth}p" || return 1
        ip link set "${veth}p" netns "$ns"
        ip link set "$veth" master "$bridge" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "${veth}p" name eth0
        ip -n "$ns" addr add "$(node_ip "$n")/24" dev eth0
        ip -n "$ns" link set eth0 up
    done

    slurmctld -i || { log "slurmctld failed"; tail -20 "$state/log/slurmctld.log" >&2; return 1; }
    for n in $nodes; do
        ip netns exec "$tag-$n" unshare --uts sh -ec '
            hostname "$1"
            mkdir -p /run/pmixcli
            mount -t tmpfs -o mode=1777 pmixcli /run/pmixcli
            exec slurmd -N "$1"
        ' sh "$n" || { log "slurmd $n failed"; tail -20 "$state/log/slurmd-$n.log" >&2; return 1; }
    done

    local want
    want=$(echo $nodes | wc -w)
    for _ in $(seq 120); do
        if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" = "$want" ]; then
            log "up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')"
            return 0
        fi
        sleep 0.5
    done
    log "nodes not idle after 60 s"
    sinfo -N >&2
    return 1
}

case "$command" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down STATE_DIR" >&2; exit 2 ;;
esac
