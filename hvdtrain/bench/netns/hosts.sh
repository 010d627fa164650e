#!/bin/bash
# Two "hosts" on this machine for communication benchmarks: network namespaces hvdb-h1 and hvdb-h2 on a
# private bridge (10.78.0.0/24, the benchmark's own addresses), each link capped with tc when a rate is
# given. Ranks are started in them by mpirun through the rsh agent below; `pin` puts rank r on core r so
# the two model two one-core hosts (Open MPI alone would bind each host's rank to core 0: the same core).
#   hosts.sh up [RATE]    RATE like 1gbit or 10gbit; none: uncapped veth
#   hosts.sh down
#   hosts.sh agent HOST CMD...   (mpirun's plm_rsh_agent) run CMD inside HOST's namespace
#   hosts.sh pin CMD...          (under mpirun --bind-to none) run CMD on core (rank mod cores)
#   hosts.sh gloo CMD...         as pin, for a rank that runs Horovod over Gloo (links.horovod_over_gloo)
set -eu
net=10.78.0
bridge=hvdbbr0
case "${1:-}" in
    up)
        rate=${2:-}
        "$0" down
        ip link add "$bridge" type bridge
        ip addr add "$net.1/24" dev "$bridge"
        ip link set "$bridge" up
        for i in 1 2; do
            ns=hvdb-h$i
            mkdir -p "/etc/netns/$ns"
            printf '127.0.0.1 localhost\n%s.1 %s\n%s.11 h1\n%s.12 h2\n' "$net" "$(hostname -s)" "$net" "$net" \
                > "/etc/netns/$ns/hosts"
            ip netns add "$ns"
            ip link add "hvdbv$i" type veth peer name "hvdbv${i}p"
            ip link set "hvdbv${i}p" netns "$ns"
            ip link set "hvdbv$i" master "$bridge" up
            ip -n "$ns" link set lo up
            ip -n "$ns" link set "hvdbv${i}p" name eth0
            ip -n "$ns" addr add "$net.1$i/24" dev eth0
            ip -n "$ns" link set eth0 up
            if [ -n "$rate" ]; then
                ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 50ms
            fi
        done
        ;;
    down)
        for i in 1 2; do
            ns=hvdb-h$i
            if ip netns pids "$ns" >/dev/null 2>&1; then
                pids=$(ip netns pids "$ns")
                [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
                ip netns del "$ns"
            fi
            rm -rf "/etc/netns/$ns"
            ip link del "hvdbv$i" 2>/dev/null || true
        done
        ip link del "$bridge" 2>/dev/null || true
        rmdir /etc/netns 2>/dev/null || true
        rm -rf /tmp/hvdb-h1 /tmp/hvdb-h2
        ;;
    agent)
        # mpirun calls: agent [options] HOST COMMAND...; skip ssh-style options it may pass
        shift
        while [ "${1:-}" != "${1#-}" ]; do shift; done
        host=$1
        shift
        # Both hosts keep this machine's hostname, so their Open MPI daemons would share one session
        # directory (and clash in it): give each host its own.
        mkdir -p "/tmp/hvdb-$host"
        exec ip netns exec "hvdb-$host" env OMPI_MCA_orte_tmpdir_base="/tmp/hvdb-$host" sh -c "$*"
        ;;
    pin)
        shift
        exec taskset -c $(( OMPI_COMM_WORLD_RANK % $(nproc) )) "$@"
        ;;
    gloo)
        # mpirun only starts this rank: Horovod's Gloo rendezvous gives it its place in the job. Each host
        # keeps this machine's hostname, which /etc/netns maps to the bridge, and Horovod 0.28.1 binds its
        # process-set contexts by hostname (HOROVOD_GLOO_IFACE reaches only the global ones): a hostname of
        # its own (h1, h2: the host's eth0 address in its hosts file) makes every context bind to eth0.
        shift
        rank=$OMPI_COMM_WORLD_RANK
        export HOROVOD_RANK=$rank HOROVOD_CROSS_RANK=$rank HOROVOD_HOSTNAME=h$(( rank + 1 ))
        exec unshare --uts sh -c 'hostname "$HOROVOD_HOSTNAME" && exec bash "$0" pin "$@"' "$0" "$@"
        ;;
    *)
        echo "usage: $0 up [RATE] | down | agent HOST CMD... | pin CMD... | gloo CMD..." >&2
        exit 2
        ;;
esac
