"""Links for communication benchmarks: plain loopback, or two "hosts" in network namespaces joined by a
tc-capped bridge (netns/hosts.sh), with ranks started by mpirun and Open MPI forced onto TCP over it."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator, Mapping

HOSTS = Path(__file__).with_name("netns") / "hosts.sh"
HOST_ADDRESSES = ("10.78.0.11", "10.78.0.12")  # h1, h2 (hosts.sh)
BRIDGE_ADDRESS = "10.78.0.1"  # this machine, as the hosts reach it


def mpirun_in_namespaces(ranks: int, exports: tuple[str, ...] = (), env: Mapping[str, str] = os.environ,
                         gloo: Mapping[str, str] | None = None) -> list[str]:
    """mpirun placing rank r on host h(r+1), pinned to core r (`hosts.sh pin`): Open MPI would bind each
    host's rank to "its" core 0, i.e. both ranks to one core. `exports` and any Open MPI parameters set in
    `env`, mpirun's environment (OMPI_MCA_*), reach every rank. gloo: the variables of
    `horovod_over_gloo`, with which the ranks run Horovod over Gloo (mpirun only starts them)."""
    hosts = ",".join(f"h{i + 1}" for i in range(ranks))
    command = ["mpirun", "--allow-run-as-root", "-np", str(ranks), "-H", hosts, "--bind-to", "none",
               "--mca", "plm_rsh_agent", f"{HOSTS} agent", "--mca", "routed", "direct",
               "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "10.78.0.0/24",
               "--mca", "oob_tcp_if_include", "10.78.0.0/24", "-x", "PATH"]
    for name in dict.fromkeys([*exports, *sorted(k for k in env if k.startswith("OMPI_MCA_"))]):
        command += ["-x", name]
    for name, value in (gloo or {}).items():
        command += ["-x", f"{name}={value}"]
    return [*command, "bash", str(HOSTS), "pin" if gloo is None else "gloo"]


def torch_distributed_env() -> dict[str, str]:
    """torch.distributed's gloo on the namespace hosts (started by mpirun): the rendezvous on rank 0's
    host, the traffic over the capped veth. Export these names to the ranks."""
    return {"MASTER_ADDR": HOST_ADDRESSES[0], "MASTER_PORT": "29531", "GLOO_SOCKET_IFNAME": "eth0"}


@contextlib.contextmanager
def horovod_over_gloo(ranks: int) -> Iterator[dict[str, str]]:
    """The variables that make ranks on the namespace hosts (one each) run Horovod over Gloo, as
    `horovodrun --gloo` would: Horovod's own rendezvous server, on the bridge, for the job's lifetime.
    Each rank's own HOROVOD_RANK is set on its host (`hosts.sh gloo`)."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer(verbose=0)
    port = server.start()
    try:
        server.init(get_host_assignments(parse_hosts(",".join(f"h{i + 1}:1" for i in range(ranks))), ranks))
        yield {"HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "eth0",
               "HOROVOD_GLOO_RENDEZVOUS_ADDR": BRIDGE_ADDRESS, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
               "HOROVOD_SIZE": str(ranks), "HOROVOD_LOCAL_RANK": "0", "HOROVOD_LOCAL_SIZE": "1",
               "HOROVOD_CROSS_SIZE": str(ranks)}
    finally:
        server.stop()


def network(link: str) -> contextlib.AbstractContextManager:
    """The network a benchmark link needs: nothing for loopback, else the capped namespace hosts."""
    return contextlib.nullcontext() if link == "loopback" else capped(link)


@contextlib.contextmanager
def capped(rate: str) -> Iterator[None]:
    """The two namespace hosts with each veth capped at `rate` (like 1gbit), removed afterwards."""
    subprocess.run(["bash", str(HOSTS), "up", rate], check=True)
    try:
        yield
    finally:
        subprocess.run(["bash", str(HOSTS), "down"], check=False)
