"""Links for communication benchmarks: plain loopback, or two "hosts" in network namespaces joined by a
tc-capped bridge (netns/hosts.sh), with ranks started by mpirun and Open MPI forced onto TCP over it."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator, Mapping

HOSTS = Path(__file__).with_name("netns") / "hosts.sh"
HOST_ADDRESSES = ("10.78.0.11", "10.78.0.12")  # h1, h2 (hosts.sh); the bridge is 10.78.0.1


def mpirun_in_namespaces(ranks: int, exports: tuple[str, ...] = (), env: Mapping[str, str] = os.environ) -> list[str]:
    """mpirun placing rank r on host h(r+1), pinned to core r (`hosts.sh pin`): Open MPI would bind each
    host's rank to "its" core 0, i.e. both ranks to one core. `exports` and any Open MPI parameters set in
    `env`, mpirun's environment (OMPI_MCA_*), reach every rank."""
    hosts = ",".join(f"h{i + 1}" for i in range(ranks))
    command = ["mpirun", "--allow-run-as-root", "-np", str(ranks), "-H", hosts, "--bind-to", "none",
               "--mca", "plm_rsh_agent", f"{HOSTS} agent", "--mca", "routed", "direct",
               "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "10.78.0.0/24",
               "--mca", "oob_tcp_if_include", "10.78.0.0/24", "-x", "PATH"]
    for name in dict.fromkeys([*exports, *sorted(k for k in env if k.startswith("OMPI_MCA_"))]):
        command += ["-x", name]
    return [*command, "bash", str(HOSTS), "pin"]


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
