"""The multi-node launch pieces without training (runtime/multinode.py): the hostfile parser and its located,
coded errors (the catalogue in tests/cases/hostfiles, as tests/cases/bad is for specs), the per-node locks,
each rank's rendezvous environment, and the shared-run-folder check (``run-folder-not-shared``)."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import pytest

from gkdc import cli
from runtime import multinode as M
from runtime.errors import RunError

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "cases" / "hostfiles"
PLAN_LAYOUT = M.Nodes(2, 8)


def _expected() -> dict[str, tuple[str, int, int]]:
    out = {}
    for line in (CASES / "EXPECTED").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, code, where = line.split("\t")
            row, col = where.split(":")
            out[name] = (code, int(row), int(col))
    return out


EXPECTED = _expected()


def test_the_catalogue_is_complete():
    assert {p.stem for p in CASES.glob("*.hostfile")} == set(EXPECTED)
    assert len(EXPECTED) >= 12


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_bad_hostfile_gets_a_located_code(name):
    code, row, col = EXPECTED[name]
    path = CASES / f"{name}.hostfile"
    with pytest.raises(RunError) as err:
        M.parse_hostfile(path, PLAN_LAYOUT)
    assert f"{path}:{row}:{col}: " in str(err.value) and str(err.value).endswith(f"[{code}]"), str(err.value)


def test_a_good_hostfile_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# the cluster\n\nnode-a.example.org slots=8   # first\n  10.0.0.2 slots = 8\n")
    nodes = M.parse_hostfile(path, PLAN_LAYOUT)
    assert nodes == M.Nodes(2, 8, ("node-a.example.org", "10.0.0.2"))
    assert M.parse_hostfile(M.write_hostfile(tmp_path / "again", nodes), PLAN_LAYOUT) == nodes
    assert M.Nodes(2, 4).hostfile() == "worker-0 slots=4\nworker-1 slots=4\n"
    with pytest.raises(RunError, match=r"cannot read the hostfile.*\[bad-hostfile\]"):
        M.parse_hostfile(tmp_path / "missing", PLAN_LAYOUT)


def test_each_rank_gets_its_global_rank():
    nodes = M.Nodes(2, 3)
    env = M.rank_env(nodes, 1, 2, "10.0.0.1", 29600, {"PATH": "/bin", "RANK": "9"})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("5", "2", "6", "10.0.0.1", "29600")
    assert env["PATH"] == "/bin" and list(nodes.ranks_of(1)) == [3, 4, 5]


def test_node_locks_share_a_folder_and_refuse_a_second_node_or_a_one_node_run(tmp_path):
    from runtime.launch import run_folder_lock

    with M.node_lock(tmp_path, 0) as t0, M.node_lock(tmp_path, 1) as t1:
        assert t0 != t1 and t1 in (tmp_path / ".lock.node1").read_text()
        with pytest.raises(RunError, match="in use by another gkdc run"), M.node_lock(tmp_path, 1):
            pass
        with pytest.raises(RunError, match="in use by another gkdc run"), run_folder_lock(tmp_path):
            pass
    with run_folder_lock(tmp_path):  # released as the nodes end
        pass


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _both(folders: tuple[Path, Path], timeout: float) -> list[object]:
    """check_shared for node 0 and node 1 in two threads (their launchers), each with its own view of --out."""
    port, results, stores = _port(), [None, None], []

    def node(rank: int) -> None:
        try:
            stores.append(M.check_shared(folders[rank], M.Nodes(2, 1), rank, "127.0.0.1", port, timeout=timeout))
        except RunError as err:
            results[rank] = err

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_a_shared_run_folder_passes(tmp_path):
    assert _both((tmp_path, tmp_path), timeout=30) == [None, None]
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "nodes").iterdir()) == ["node0", "node1"]


def test_a_folder_each_node_sees_alone_is_refused_with_its_path(tmp_path):
    a, b = tmp_path / "node0-disk", tmp_path / "node1-disk"
    errors = _both((a, b), timeout=1.0)
    for err in errors:
        assert isinstance(err, RunError) and str(err).endswith("[run-folder-not-shared]"), errors
    assert str(a) in str(errors[0]) and "node0-disk" in str(errors[1])


def _plan_file(tmp_path: Path) -> Path:
    spec = tmp_path / "two.gkd"
    spec.write_text(f'teacher t = hf("{ROOT}/examples/tiny") {{ init: random }}\nstudent s = like(t) {{ layers: 1 }}\n'
                    f'data corpus = text("{ROOT}/examples/data/corpus.txt") {{ seq_len: 32 }}\n'
                    "stage d { data: corpus, steps: 2, batch: 8, loss: kl(t.logits, s.logits) }\n"
                    "cluster { nodes: 2, gpus: 1 x cpu per node, cpu_memory: 8GB }\n")
    assert _cli("plan", str(spec), "-o", str(tmp_path / "plan.json"), "--allow-path", str(ROOT))[0] == 0
    return tmp_path / "plan.json"


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(list(argv))
    return status, err.getvalue()


def test_the_command_line_reports_the_codes_without_a_traceback(tmp_path):
    plan = _plan_file(tmp_path)
    assert json.loads(plan.read_text())["world_size"] == 2
    out = str(tmp_path / "run")
    status, err = _cli("run", str(plan), "--out", out, "--hostfile", str(CASES / "slots-mismatch.hostfile"),
                       "--node-rank", "1")
    assert status == 1 and "slots-mismatch.hostfile:1:1: slots=8, but the plan runs 1 rank" in err, err
    status, err = _cli("run", str(plan), "--out", out, "--node-rank", "2")
    assert status == 1 and "outside the plan's 2 node(s)" in err, err
    status, err = _cli("run", str(plan), "--out", out, "--allow-path", str(ROOT))  # neither a node rank nor a hostfile: the template
    assert status == 1 and "--node-rank" in err and (tmp_path / "run" / "hostfile").read_text() == \
        "worker-0 slots=1\nworker-1 slots=1\n", err
    status, err = _cli("run", str(plan), "--out", out, "--hostfile", str(CASES / "slots-mismatch.hostfile"),
                       "--allow-path", str(ROOT))
    assert status == 1 and "[bad-hostfile]" in err, err
    assert "Traceback" not in err


def test_one_failing_rank_stops_the_nodes_other_ranks():
    import os
    import sys

    script = "import os, sys, time\nif os.environ['RANK'] == '2': sys.exit(3)\ntime.sleep(120)\n"
    codes = M.start_ranks(M.Nodes(2, 2), 1, "127.0.0.1", 29999, [sys.executable, "-c", script], dict(os.environ))
    assert codes[0] == 3 and codes[1] != 0  # rank 2 (local 0) failed; rank 3 was stopped, not left waiting
