"""An emulated cluster on one Linux machine: network namespaces, veth pairs, a bridge.

Each emulated host is a network namespace ``<prefix>-h<i>`` with one interface
(``<prefix>h<i>b``, address ``10.213.7.<10+i>/24``) whose veth peer
(``<prefix>h<i>a``) is a port of the bridge ``<prefix>br`` in the root namespace.
The bridge carries ``10.213.7.1``, the address ``mpiexec`` (which runs in the
root namespace) gives its proxies to call back on. The subnet exists only
inside this machine.

Optionally every link is shaped with ``tc ... tbf`` in both directions
(egress of each end of the veth pair), so a host's link behaves like a
full-duplex NIC of ``rate`` (e.g. ``"1gbit"``).

``mpiexec`` reaches the hosts through :data:`LAUNCHER` (``tests/cluster/netns-ssh``),
an ssh replacement for hydra's ``-launcher ssh -launcher-exec``: it ignores the
ssh options, maps the host address to its namespace and runs the command there
with ``ip netns exec``, in a fresh UTS namespace whose hostname is the host's
name. Ranks on one emulated host share memory (MPICH learns node locality from
hydra's host list); ranks on different hosts talk over the veth link only
(``UCX_TLS=tcp,self``: UCX would otherwise find the shared memory the
namespaces secretly share and bypass the link).

Everything carries the prefix, so :func:`cleanup_leftovers` can remove what a
killed run left behind (namespaces, links, the processes inside). Needs root.

Command line (for manual use and the benchmark)::

    python tests/cluster/netns.py up --hosts 2 --rate 1gbit
    python tests/cluster/netns.py down
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LAUNCHER = HERE / "netns-ssh"
DEFAULT_PREFIX = "hsgd"
LOCK_PATH = "/run/hpcsgd-netns.lock"
HOSTS_ENV = "HPCSGD_NETNS_HOSTS"  # "ip=namespace=hostname,..." read by the launcher
# Environment every rank needs in the emulated cluster (see module docstring).
RANK_ENV = {"UCX_TLS": "tcp,self"}


class ClusterUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no iproute2, no kernel support)."""


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def unavailable_reason() -> str | None:
    """Why an emulated cluster cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, bridge)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (install iproute2 / util-linux)"
    probe = f"{DEFAULT_PREFIX}-probe{os.getpid()}"
    res = _run(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        return f"'ip netns add' failed: {res.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _netns_list() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _links() -> list[str]:
    res = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def kill_namespace_processes(ns: str, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every process inside namespace ``ns``; returns how many."""
    res = _run(["ip", "netns", "pids", ns], check=False)
    n = 0
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), sig)
            n += 1
        except (ProcessLookupError, ValueError):
            pass
    return n


def cleanup_leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every namespace, link and process carrying ``prefix``; idempotent.

    Returns what was removed (for logs). Safe to call when nothing is there.
    """
    removed = []
    for ns in _netns_list():
        if ns.startswith(prefix + "-"):
            kill_namespace_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"netns {ns}")
    for link in _links():
        if link.startswith(prefix) and (link.endswith("br") or link[len(prefix):].startswith("h")):
            _run(["ip", "link", "del", link], check=False)
            removed.append(f"link {link}")
    return removed


@dataclass
class Host:
    index: int
    name: str  # namespace and hostname
    addr: str  # IPv4 address on the test subnet
    ns_if: str  # interface inside the namespace
    br_if: str  # its veth peer, a bridge port in the root namespace


@dataclass
class EmulatedCluster:
    """``n_hosts`` emulated hosts; use as a context manager or call up()/down()."""

    n_hosts: int = 2
    rate: str | None = None  # tbf rate per link and direction, e.g. "1gbit"; None: unshaped
    prefix: str = DEFAULT_PREFIX
    subnet: str = "10.213.7"  # the private test subnet, <subnet>.0/24
    hosts: list[Host] = field(default_factory=list)
    _lock_fd: int | None = None

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def gateway(self) -> str:
        """The bridge's address: where mpiexec in the root namespace is reached."""
        return f"{self.subnet}.1"

    # -- lifecycle -------------------------------------------------------
    def up(self) -> EmulatedCluster:
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        if not 1 <= self.n_hosts <= 200:
            raise ValueError(f"n_hosts={self.n_hosts} must be in 1..200")
        self._lock_fd = os.open(LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # one emulated cluster at a time
        try:
            cleanup_leftovers(self.prefix)
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            self.hosts = []
            for i in range(self.n_hosts):
                h = Host(i, f"{self.prefix}-h{i}", f"{self.subnet}.{10 + i}",
                         f"{self.prefix}h{i}b", f"{self.prefix}h{i}a")
                _run(["ip", "netns", "add", h.name])
                _run(["ip", "link", "add", h.br_if, "type", "veth", "peer", "name", h.ns_if])
                _run(["ip", "link", "set", h.ns_if, "netns", h.name])
                _run(["ip", "link", "set", h.br_if, "master", self.bridge, "up"])
                _run(["ip", "-n", h.name, "addr", "add", f"{h.addr}/24", "dev", h.ns_if])
                _run(["ip", "-n", h.name, "link", "set", h.ns_if, "up"])
                _run(["ip", "-n", h.name, "link", "set", "lo", "up"])
                self.hosts.append(h)
            if self.rate:
                self.shape(self.rate)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill what runs inside, remove namespaces, links and the bridge; idempotent."""
        try:
            cleanup_leftovers(self.prefix)
        finally:
            self.hosts = []
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> EmulatedCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- link control ----------------------------------------------------
    def shape(self, rate: str | None, burst: str = "1mb", latency: str = "100ms") -> None:
        """Limit every link to ``rate`` in both directions with tbf (None: remove)."""
        for h in self.hosts:
            for cmd_prefix, dev in ((["tc"], h.br_if), (["ip", "netns", "exec", h.name, "tc"], h.ns_if)):
                _run([*cmd_prefix, "qdisc", "del", "dev", dev, "root"], check=False)
                if rate:
                    _run([*cmd_prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                          "burst", burst, "latency", latency])
        self.rate = rate

    def cut_link(self, host: int) -> None:
        """Pull the cable of ``host``: both ends of its veth go down (no RST, no FIN)."""
        h = self.hosts[host]
        _run(["ip", "link", "set", h.br_if, "down"])
        _run(["ip", "-n", h.name, "link", "set", h.ns_if, "down"])

    def restore_link(self, host: int) -> None:
        h = self.hosts[host]
        _run(["ip", "-n", h.name, "link", "set", h.ns_if, "up"])
        _run(["ip", "link", "set", h.br_if, "up"])

    def link_bytes(self, host: int) -> dict:
        """Bytes sent/received by ``host`` over its link so far."""
        br = Path("/sys/class/net") / self.hosts[host].br_if / "statistics"
        # The bridge end receives what the host sends.
        return {"tx": int((br / "rx_bytes").read_text()), "rx": int((br / "tx_bytes").read_text())}

    # -- running things --------------------------------------------------
    def hosts_env(self) -> str:
        return ",".join(f"{h.addr}={h.name}={h.name}" for h in self.hosts)

    def exec_cmd(self, host: int, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed to run inside emulated host ``host``."""
        return ["ip", "netns", "exec", self.hosts[host].name, *cmd]

    def mpiexec_args(self, ranks_per_host: int) -> list[str]:
        """hydra options that spread ``ranks_per_host`` ranks on every host (block placement)."""
        hosts = ",".join(f"{h.addr}:{ranks_per_host}" for h in self.hosts)
        return ["-launcher", "ssh", "-launcher-exec", str(LAUNCHER), "-hosts", hosts,
                "-localhost", self.gateway]

    def env(self) -> dict:
        """Environment for mpiexec (passed on to every rank)."""
        return {HOSTS_ENV: self.hosts_env(), **RANK_ENV}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the emulated hosts (removes leftovers first)")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--rate", default=None, help="tbf rate per link, e.g. 1gbit")
    sub.add_parser("down", help="remove every namespace/link with the prefix")
    sub.add_parser("check", help="say whether an emulated cluster can be built here")
    for s in sub.choices.values():
        s.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)
    if args.cmd == "check":
        reason = unavailable_reason()
        print(reason or "ok")
        return 1 if reason else 0
    if args.cmd == "down":
        print("\n".join(cleanup_leftovers(args.prefix)) or "nothing to remove")
        return 0
    c = EmulatedCluster(n_hosts=args.hosts, rate=args.rate, prefix=args.prefix).up()
    if c._lock_fd is not None:
        os.close(c._lock_fd)
        c._lock_fd = None
    print(f"{HOSTS_ENV}={c.hosts_env()}")
    print("mpiexec " + " ".join(c.mpiexec_args(2)) + " -genv UCX_TLS tcp,self ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
