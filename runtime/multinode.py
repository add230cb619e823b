"""Several nodes: the node layout, DeepSpeed hostfiles, the shared-run-folder check and this node's ranks.

``gkdc run plan.json --out DIR --node-rank R`` on each node (docs/runtime.md, "Several nodes"): this process
holds its node's lock (``DIR/.lock.node<R>`` exclusive, ``DIR/.lock`` shared, so a one-node run cannot take the
folder meanwhile and the nodes do not refuse each other), checks with node 0 that every node sees the same run
folder (a token file per node; error ``run-folder-not-shared``), then starts its own ranks as
``python -m runtime.worker`` with torch.distributed's environment rendezvous (``MASTER_ADDR``/``MASTER_PORT``,
``RANK = node_rank * gpus_per_node + local``, ``WORLD_SIZE``, ``LOCAL_RANK``). The launchers meet on
``MASTER_PORT + 1`` (a torch TCPStore served by node 0's launcher); the ranks on ``MASTER_PORT``.

The hostfile parser is our own: DeepSpeed's (``deepspeed.launcher.runner.fetch_hostfile``) reports a bad line
by raising ValueError without a line number and allows no slots count check against the plan.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from runtime.errors import RunError
from runtime.locks import LOCK_ENV, LOCK_FILE, LOCK_FILE_ENV, lock_or_refuse

#: seconds node 0 waits for every node's token (and the other nodes for node 0); overridable for slow file systems
TIMEOUT_ENV = "GKDC_NODE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
MAX_RANKS_PER_NODE = 1024
#: seconds a node's other ranks get to stop (SIGTERM) after one failed, before SIGKILL
STOP_GRACE_S = 30.0
TOKENS = "nodes"
_HOST = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,253}")
_LINE = re.compile(r"(?P<host>\S+)(?P<rest>.*)")


@dataclass(frozen=True)
class Nodes:
    """The node layout of a plan: ``nodes`` x ``per_node`` ranks; host names when a hostfile gave them."""

    nodes: int
    per_node: int
    hosts: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    def ranks_of(self, node_rank: int) -> range:
        """The global ranks node ``node_rank`` runs."""
        return range(node_rank * self.per_node, (node_rank + 1) * self.per_node)

    def hostfile(self) -> str:
        """DeepSpeed hostfile text (``host slots=N`` a line); placeholder names where no hosts are known."""
        hosts = self.hosts or tuple(f"worker-{i}" for i in range(self.nodes))
        return "".join(f"{h} slots={self.per_node}\n" for h in hosts)


@dataclass(frozen=True)
class NodeOptions:
    """``gkdc run``'s node flags: ``--hostfile``, ``--node-rank``, ``--master-addr``, ``--master-port``."""

    hostfile: Path | None = None
    rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None


def layout(plan) -> Nodes:
    """The plan's node layout, checked against its world size."""
    cluster = plan.spec.cluster
    nodes = Nodes(count(cluster.nodes, "nodes"), count(cluster.gpus_per_node, "gpus per node"))
    if nodes.world_size != plan.world_size:
        raise RunError(f"the plan's world_size {plan.world_size} disagrees with its cluster ({nodes.nodes} node(s) x "
                       f"{nodes.per_node}); the plan was edited: re-run `gkdc plan`")
    return nodes


def count(value: object, what: str) -> int:
    """A plan's node or per-node rank count, checked (a plan is input: anyone may have edited it)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANKS_PER_NODE:
        raise RunError(f"the plan's cluster has {value!r} {what}; expected a whole number from 1 to "
                       f"{MAX_RANKS_PER_NODE}: re-run `gkdc plan`")
    return value


def _bad(path: Path, line: int, col: int, message: str) -> RunError:
    return RunError(f"{path}:{line}:{col}: {message}  [bad-hostfile]")


def parse_hostfile(path: Path, expect: Nodes | None = None) -> Nodes:
    """Read a DeepSpeed hostfile (``host slots=N`` a line, ``#`` comments, blank lines); with ``expect``, its
    hosts must number the plan's nodes and each give the plan's gpus per node. Located, coded errors."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise RunError(f"{path}: cannot read the hostfile: {err.strerror or err}  [bad-hostfile]") from None
    except UnicodeDecodeError as err:
        head = err.object[:err.start]
        line, col = head.count(b"\n") + 1, err.start - (head.rfind(b"\n") + 1) + 1
        raise _bad(path, line, col, f"the hostfile is not UTF-8 text (byte {err.start})") from None
    hosts: list[str] = []
    slots: list[tuple[int, int]] = []  # (slots, line)
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        body = raw.split("#", 1)[0]
        if not body.strip():
            continue
        m = _LINE.match(body.lstrip())
        col = len(body) - len(body.lstrip()) + 1
        host, rest = m["host"], m["rest"].strip()
        if not _HOST.fullmatch(host):
            raise _bad(path, n, col, f"{host[:60]!r} is not a host name")
        if host in seen:
            raise _bad(path, n, col, f"host {host} is listed twice (first on line {seen[host]})")
        where = col + len(host) + (len(m["rest"]) - len(m["rest"].lstrip()))
        sm = re.fullmatch(r"slots\s*=\s*(\d{1,4})", rest)
        if not sm:
            got = f"{rest[:40]!r}" if rest else "nothing"
            raise _bad(path, n, where, f"expected `slots=N` after the host name, found {got}")
        count = int(sm[1])
        if count < 1:
            raise _bad(path, n, where, f"host {host} has slots={count}; a node needs at least one slot")
        seen[host] = n
        hosts.append(host)
        slots.append((count, n))
    if not hosts:
        raise RunError(f"{path}:1:1: the hostfile lists no hosts (expected `host slots=N` lines)  [bad-hostfile]")
    if expect is not None:
        if len(hosts) != expect.nodes:
            raise RunError(f"{path}:1:1: the hostfile lists {len(hosts)} host(s) but the plan has {expect.nodes} "
                           f"node(s)  [bad-hostfile]")
        for count, n in slots:
            if count != expect.per_node:
                raise _bad(path, n, 1, f"slots={count}, but the plan runs {expect.per_node} rank(s) per node")
    return Nodes(len(hosts), slots[0][0] if expect is None else expect.per_node, tuple(hosts))


def write_hostfile(path: Path, nodes: Nodes) -> Path:
    path = Path(path)
    path.write_text(nodes.hostfile(), encoding="utf-8")
    return path


def rank_env(nodes: Nodes, node_rank: int, local: int, master_addr: str, master_port: int,
             base: dict[str, str]) -> dict[str, str]:
    """The environment of one rank this node starts: torch.distributed's env rendezvous."""
    env = dict(base)
    env.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), WORLD_SIZE=str(nodes.world_size),
               RANK=str(node_rank * nodes.per_node + local), LOCAL_RANK=str(local),
               LOCAL_WORLD_SIZE=str(nodes.per_node), GROUP_RANK=str(node_rank))
    return env


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return max(float(value), 0.1) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise RunError(f"{TIMEOUT_ENV}={value[:40]!r} is not a number of seconds") from None


@contextlib.contextmanager
def node_lock(out: Path, node_rank: int) -> Iterator[str]:
    """This node's share of the run folder's lock; yields the token its ranks verify (runtime.worker)."""
    import fcntl
    import socket

    name = f"{LOCK_FILE}.node{node_rank}"
    shared = open(out / LOCK_FILE, "a+", encoding="utf-8")
    mine = open(out / name, "a+", encoding="utf-8")
    try:
        lock_or_refuse(shared, fcntl.LOCK_SH, out)
        lock_or_refuse(mine, fcntl.LOCK_EX, out)
        token = f"node {node_rank}, pid {os.getpid()} on {socket.gethostname()} run {os.urandom(8).hex()}"
        mine.seek(0)
        mine.truncate()
        mine.write(token + "\n")
        mine.flush()
        os.environ[LOCK_ENV], os.environ[LOCK_FILE_ENV] = token, name
        yield token
    finally:
        os.environ.pop(LOCK_ENV, None)
        os.environ.pop(LOCK_FILE_ENV, None)
        mine.close()
        shared.close()


def _wait_for(paths: list[Path], deadline: float) -> list[Path]:
    """Poll until every path exists or the deadline passes; returns the missing ones."""
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)
        with contextlib.suppress(OSError):  # NFS: re-reading the folder refreshes its cached listing
            os.listdir(paths[0].parent)


def check_shared(out: Path, nodes: Nodes, node_rank: int, master_addr: str, port: int,
                 timeout: float | None = None):
    """Every node writes a token file in ``out/nodes`` and node 0 checks it sees them all (and each node sees
    node 0's); the launchers meet on a TCPStore at ``master_addr:port``. Returns the store (node 0 serves it:
    keep it alive while the other nodes may still read the verdict). RunError ``run-folder-not-shared``."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = _timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    folder = out / TOKENS
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"node{node_rank}.*"):
        old.unlink(missing_ok=True)
    try:
        store = dist.TCPStore(master_addr, port, nodes.nodes, node_rank == 0, timedelta(seconds=timeout),
                              wait_for_workers=False)
    except Exception as err:  # torch raises RuntimeError/DistStoreError/TimeoutError variously
        role = f"serve the launchers' rendezvous on port {port}" if node_rank == 0 else \
            f"reach node 0's launcher at {master_addr}:{port}"
        raise RunError(f"node {node_rank} could not {role}: {str(err).splitlines()[0][:200]} (start node 0 "
                       f"first, or check --master-addr/--master-port)") from None
    try:
        if node_rank == 0:
            nonce = os.urandom(8).hex()
            (folder / f"node0.{nonce}").write_text(f"{os.uname().nodename}\n", encoding="utf-8")
            store.set("nonce", nonce)
            others = [folder / f"node{r}.{nonce}" for r in range(1, nodes.nodes)]
            missing = _wait_for(others, deadline)
            seen = {r: store.get(f"seen{r}").decode() for r in range(1, nodes.nodes)} if not missing else {}
            blind = [r for r, v in seen.items() if v != "yes"]
            if missing or blind:
                who = (f"node 0 does not see the token file(s) {', '.join(str(p) for p in missing)} of the other "
                       f"node(s) after {timeout:g} s" if missing else
                       f"node(s) {', '.join(map(str, blind))} do not see node 0's token {folder / f'node0.{nonce}'}")
                verdict = f"{out} is not one folder shared by every node: {who}; put --out on a file system every " \
                          f"node mounts at the same path (NFS, Lustre)  [run-folder-not-shared]"
                store.set("verdict", verdict)
                raise RunError(verdict)
            store.set("verdict", "ok")
        else:
            nonce = store.get("nonce").decode()
            sees = not _wait_for([folder / f"node0.{nonce}"], deadline)
            (folder / f"node{node_rank}.{nonce}").write_text(f"{os.uname().nodename}\n", encoding="utf-8")
            store.set(f"seen{node_rank}", "yes" if sees else "no")
            verdict = store.get("verdict").decode()
            if verdict != "ok":
                raise RunError(verdict)
    except RunError:
        raise
    except Exception as err:  # a store timeout: the other side never answered
        raise RunError(f"{out}: node {node_rank} waited {timeout:g} s for the other nodes' launchers at "
                       f"{master_addr}:{port} in vain ({str(err).splitlines()[0][:160]})  "
                       "[run-folder-not-shared]") from None
    return store


def start_ranks(nodes: Nodes, node_rank: int, master_addr: str, master_port: int, argv: list[str],
                base_env: dict[str, str]) -> list[int]:
    """Start this node's ranks (``argv``: the worker command) and wait for them; their exit statuses. When one
    fails the others are stopped (their peers' collectives would otherwise wait for the backend's timeout)."""
    def stop(signum, frame):  # SIGTERM to the launcher: unwind through the finally below, stopping the ranks
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    procs = [subprocess.Popen(argv, env=rank_env(nodes, node_rank, local, master_addr, master_port, base_env))
             for local in range(nodes.per_node)]
    stopping: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) and stopping is None:
                stopping = time.monotonic() + STOP_GRACE_S
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if stopping is not None and time.monotonic() > stopping:
                break  # the finally kills what did not stop
            time.sleep(0.2)
    finally:
        for p in procs:  # this launcher interrupted (Ctrl-C, SIGTERM): its ranks go with it
            if p.poll() is None:
                p.kill()
                p.wait()
        signal.signal(signal.SIGTERM, before)
    return [p.returncode for p in procs]


def run_node(plan, plan_path: Path, out: Path, argv: list[str], nodes: Nodes, node_rank: int, master_addr: str,
             master_port: int, base_env: dict[str, str]) -> None:
    """One node's part of a multi-node run (module docstring); RunError unless its ranks all finished."""
    if not 1 <= master_port <= 65534:
        raise RunError(f"--master-port {master_port} is outside 1..65534 (the launchers use it + 1)")
    with node_lock(out, node_rank):
        mine = [out / "ranks" / f"rank{r}.json" for r in nodes.ranks_of(node_rank)]
        for stale in mine:
            stale.unlink(missing_ok=True)
        store = check_shared(out, nodes, node_rank, master_addr, master_port + 1)
        print(f"node {node_rank}: run folder {out} shared by {nodes.nodes} nodes; starting ranks "
              f"{nodes.ranks_of(node_rank).start}-{nodes.ranks_of(node_rank).stop - 1} (rendezvous "
              f"{master_addr}:{master_port})", file=sys.stderr)
        env = {**base_env, **{k: os.environ[k] for k in (LOCK_ENV, LOCK_FILE_ENV)}}
        codes = start_ranks(nodes, node_rank, master_addr, master_port, argv, env)
        del store
    done = [p for p in mine if p.exists()]
    if len(done) != len(mine):
        raise RunError(f"node {node_rank}: {len(done)} of its {len(mine)} ranks finished (exit statuses "
                       f"{codes}); see the messages above. Resume with the same command and --resume on every node")
    if any(codes):
        print(f"note: node {node_rank}'s ranks exited with {codes} after every rank finished (a known exit-time "
              "abort of multi-rank ZeRO-3 on CPU); results are complete", file=sys.stderr)
