"""Measured vs predicted host memory of real two-rank CPU runs: models built into their placement (issue 11).

Each case plans a spec with ``gkdc plan`` (``cluster { gpus: 2 x cpu, cpu_memory: ... }``), runs the plan with
the ``deepspeed`` launcher (2 ranks, gloo) and samples every rank's ``/proc/<pid>/status`` from outside the
process every 50 ms: ``VmHWM`` (the kernel's peak resident set: anonymous + file-backed + shared pages) at the
rank's exit and the highest ``RssAnon`` seen (anonymous memory: what the rank allocated itself). The plan's
predicted host figure for that rank is ``StagePlan.host[rank].peak`` (``planner.hostmem.host_phases``: the
largest of load / train / save). Each case is run twice: with this checkout and with the old whole-copy
runtime (``--old-rev``, the commit before issue 11, unpacked with ``git archive``; it plans its own plan).

Cases (the teacher: Llama-style, random bf16 weights, 3.08 GB, ``bench/make_teacher.py``):

- ``sharded``: ``cpu_memory: 8GB`` leaves 3.73 GiB per rank (3.35 usable after the planner's margin): a whole
  teacher per rank does not fit, the planner picks ``sharded``; small replicated student.
- ``zero3``: a 1.2 GB fp32 student (4 blocks at the teacher's width) trained under ZeRO-3 (pinned through the
  plan; ``cpu_memory: 14GB``), MSE on hidden states of block 3, so the teacher is pruned to blocks 0..3 and sharded.
- ``cpu_offload``: the ``sharded`` spec with the teacher pinned to ``cpu_offload`` (ZeRO-3, parameters
  offloaded to host memory: on CPU the same memory as sharded, a different DeepSpeed path).
- ``zero3_vocab``: a pretrained 1.58 GB fp32 student (a local folder, 6 blocks at the teacher's width) with a
  compressed vocabulary (GLMD, 8000 of 32000 rows: 1.19 GB) under ZeRO-3 (pinned), KL on the teacher's logits
  (teacher sharded). Its old runtime is main at e3c510b, which built such a student whole on every rank.

Pinned placements are applied to the Plan object with the planner's own functions (estimate, DeepSpeed configs,
host phases) until the language can pin them. Pass criteria printed per rank: VmHWM within 15% of the predicted
host peak, and below 0.6 x teacher bytes + the student's share (everything the plan puts on that rank at its
peak phase besides the teacher: student, runtime, buffers). Heavy: run under the shared lock,
``flock /work/notes/heavy.lock timeout 900 python bench/scale.py --cases sharded``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/gkdc-scale")
OLD_REV = "806f957"  # main before issue 11: models built whole on every rank, full per-rank copies at hand-off
TOLERANCE = 0.15
GiB = 2**30


@dataclass(frozen=True)
class Case:
    name: str
    student: str
    loss: str
    cpu_memory: str
    pin: dict
    """Placement fields to pin (applied to the plan) and ``teacher`` -> strategy."""
    pretrained: bool = False
    """The student is a pretrained local folder (``student_folder``: fp32, 6 blocks at the teacher's width) with
    a compressed vocabulary (GLMD: a quarter of the teacher's rows, ranked on the corpus, remapped by the
    teacher's embeddings); ``student`` is then unused."""
    student_files: str = "fp32"
    """dtype of the pretrained student's files (it trains in fp32): with bf16 files a whole build converts
    every tensor into memory of its own; fp32 files are mapped by ``from_pretrained`` (file pages)."""
    old_rev: str | None = None
    """The old runtime of this case when it is not ``--old-rev`` (the code path this case's work replaced)."""


CASES = {
    "sharded": Case("sharded", "layers: 2, hidden: 512, heads: 8, kv_heads: 4, intermediate: 1408",
                    "kl(t.logits, s.logits, T: 2)", "8GB", {}),
    "zero3": Case("zero3", "layers: 4", "mse(t.hidden[3], s.hidden[3])", "14GB",
                  {"zero_stage": 3, "teacher": "sharded"}),
    "cpu_offload": Case("cpu_offload", "layers: 2, hidden: 512, heads: 8, kv_heads: 4, intermediate: 1408",
                        "kl(t.logits, s.logits, T: 2)", "8GB", {"teacher": "cpu_offload"}),
    # main at e3c510b built a pretrained ZeRO-3 student with a compressed vocabulary whole on every rank
    "zero3_vocab": Case("zero3_vocab", "", "kl(t.logits, s.logits, T: 2)", "16GB",
                        {"zero_stage": 3, "teacher": "sharded"}, pretrained=True, old_rev="e3c510b"),
    "zero3_vocab_bf16": Case("zero3_vocab_bf16", "", "kl(t.logits, s.logits, T: 2)", "16GB",
                             {"zero_stage": 3, "teacher": "sharded"}, pretrained=True, student_files="bf16",
                             old_rev="e3c510b"),
}
STUDENT_SHAPE = {"layers": 6, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000}
"""The pretrained student of ``zero3_vocab``: 1.58 GB fp32 whole, 1.19 GB at its 8000 kept rows."""


def spec_text(case: Case, teacher: Path, student: Path | None = None) -> str:
    model = f'student s = like(t) {{ {case.student} }}' if not case.pretrained else \
        f'student s = hf("{student}") {{ dtype: fp32, frozen: false }}'
    vocab = "" if not case.pretrained else \
        "vocab s from t {\n  keep: 25%\n  rank: frequency(corpus)\n  remap: nearest(t.embeddings)\n}\n"
    return f"""# bench/scale.py case {case.name}
teacher t = hf("{teacher}") {{ dtype: bf16 }}
{model}
data corpus = text("corpus.txt") {{ seq_len: 64 }}
{vocab}stage distill {{
  data: corpus
  steps: 3
  batch: 2
  optimizer: adamw(lr: 1e-4)
  loss: {case.loss}
}}
cluster {{ gpus: 2 x cpu, cpu_memory: {case.cpu_memory} }}
"""


def corpus(path: Path) -> None:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(f"w{rng.randrange(2000)}" for _ in range(rng.randint(40, 90)))
                              for _ in range(32)))


# ---------------------------------------------------------------- planning (and pinning)


def plan(code: Path, spec: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, "-m", "gkdc.cli", "plan", str(spec), "-o", str(out)], env=env,
                          capture_output=True, text=True, cwd=spec.parent)
    if proc.returncode != 0:
        raise SystemExit(f"gkdc plan failed ({code}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


PIN_SCRIPT = r"""
import json, sys
from planner import dsconfig, memory, placement as P
try:
    from planner.hostmem import host_memory
except ImportError:  # the old runtime's tree plans no host phases
    host_memory = None
from planner.build import model_params, world_size
from planner.hardware import device_for
from planner.plan import Plan
path, pin = sys.argv[1], json.loads(sys.argv[2])
plan = Plan.model_validate_json(open(path).read())
spec, world = plan.spec, plan.world_size
stages = []
for sp, st in zip(plan.stages, spec.stages):
    fields = {k: v for k, v in pin.items() if k != "teacher"}
    if "teacher" in pin:
        fields["teacher_strategy"] = {t: pin["teacher"] for t in sp.placement.teacher_strategy}
        # the degree of a strategy the planner picked (tensor_parallel, hpZ) is not the pinned one's
        fields |= {"teacher_tp": {}, "teacher_hpz": {}} if pin["teacher"] != "tensor_parallel" else {}
    p = sp.placement.model_copy(update=fields)
    params = {c.model: model_params(spec.models[c.model]) for c in sp.captures}
    models = P.stage_models(spec, st, sp.captures, params)
    cluster = P.cluster_shape(spec, device_for(spec.cluster), world)
    mem = memory.estimate(models, cluster, p)
    host = host_memory(models, cluster, p, mem) if host_memory is not None else ([], 0)
    teachers = {c.model: dsconfig.teacher_ds_config(p, spec.models[c.model], world) for c in sp.captures
                if c.model not in st.students}
    # a pinned teacher strategy may forbid the fused head the planner chose for the replicated one
    fused = getattr(memory, "fused_head", None)
    captures = [c.model_copy(update={"fused_head": fused(models, c.model, p)}) if fused else c for c in sp.captures]
    update = {"captures": captures, "placement": p, "memory": mem, "deepspeed_config": dsconfig.student_ds_config(p, st, world),
              "teacher_configs": {k: v for k, v in teachers.items() if v}}
    if host_memory is not None:
        update |= {"host": host[0], "host_node_peak": host[1]}
    stages.append(sp.model_copy(update=update))
plan = plan.model_copy(update={"stages": stages})
try:  # `gkdc run` refuses an edited plan unless it is sealed again (the old runtime's tree has no digest)
    from planner.plan import sealed
    plan = sealed(plan)
except ImportError:
    pass
open(path, "w").write(plan.model_dump_json(indent=1))
"""


def pin(code: Path, plan_path: Path, fields: dict) -> None:
    if not fields:
        return
    env = {**os.environ, "PYTHONPATH": str(code)}
    # cwd = the code's tree: ``python -c`` puts the working directory first on sys.path
    proc = subprocess.run([sys.executable, "-c", PIN_SCRIPT, str(plan_path), json.dumps(fields)], env=env,
                          capture_output=True, text=True, cwd=code)
    if proc.returncode != 0:
        raise SystemExit(f"pinning failed:\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------- running and sampling


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _rank_pids() -> dict[int, int]:
    """local rank -> pid of every runtime.worker process started with ``--local_rank=N`` by this user."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runtime.worker" in argv and str(RUN_TAG).encode() in b" ".join(argv):
            for a in argv:
                if a.startswith(b"--local_rank="):
                    found[int(a.split(b"=")[1])] = int(entry.name)
    return found


RUN_TAG = ""


def launch(code: Path, plan_path: Path, out: Path, timeout: float) -> dict:
    """Run the plan on 2 ranks; sample each rank's memory from outside; returns peaks and the exit status."""
    global RUN_TAG
    RUN_TAG = str(out)  # the out dir is in every rank's argv: only this run's ranks are sampled
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env["PYTHONPATH"] = str(code)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    argv = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port()),
            "--module", "runtime.worker", str(plan_path), str(out), "--no-progress"]
    log = open(out.parent / f"{out.name}.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=plan_path.parent, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, dict[str, int]] = {}
    timeline: list[tuple[float, dict[int, int]]] = []  # (s, rank -> RssAnon) every 0.5 s, to see the phases
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            proc.kill()
            break
        for rank, pid in _rank_pids().items():
            st = _status(pid)
            if st:
                p = peaks.setdefault(rank, {"VmHWM": 0, "RssAnon": 0, "RssFile": 0})
                for k in p:
                    p[k] = max(p[k], st.get(k, 0))
        now = time.monotonic() - start
        if not timeline or now - timeline[-1][0] >= 0.5:
            timeline.append((round(now, 1), {r: _status(pid).get("RssAnon", 0) >> 20 for r, pid in _rank_pids().items()}))
        time.sleep(0.05)
    log.close()
    done = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))] if (out / "ranks").exists() else []
    return {"rc": proc.returncode, "peaks": peaks, "finished": len(done), "seconds": time.monotonic() - start,
            "saved": (out / "student" / "config.json").exists(), "timeline_mib": timeline}


def old_tree(rev: str) -> Path:
    """The runtime before issue 11, unpacked from git (read-only use of the repository)."""
    dest = WORK / f"old-{rev}"
    if not (dest / "runtime").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True,
                                 check=True).stdout
        tar = dest / "src.tar"
        tar.write_bytes(archive)
        with tarfile.open(tar) as t:
            t.extractall(dest, filter="data")
        tar.unlink()
    return dest


# ---------------------------------------------------------------- one case


def predicted(plan_path: Path) -> dict:
    plan = json.loads(plan_path.read_text())
    st = plan["stages"][0]
    host = {h["rank"]: h for h in st.get("host", [])}
    return {"placement": st["placement"], "host": host, "train": st["memory"][0]["total_gpu"]}


def student_folder(teacher: Path, files: str = "fp32") -> Path:
    """The pretrained student of the ``zero3_vocab`` cases beside the teacher, its files in ``files``
    (made once, one tensor at a time)."""
    folder = teacher.with_name(f"student-{files}")
    if not (folder / "config.json").exists():
        import torch

        sys.path[:0] = [str(REPO), str(REPO / "bench")]
        from make_teacher import make

        make(folder, dtype=torch.float32 if files == "fp32" else torch.bfloat16, seed=1, **STUDENT_SHAPE)
    return folder


def run_case(case: Case, teacher: Path, old: Path | None, timeout: float) -> list[dict]:
    root = WORK / case.name
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "spec.gkd"
    spec.write_text(spec_text(case, teacher, student_folder(teacher, case.student_files) if case.pretrained else None))
    if case.old_rev is not None and old is not None:
        old = old_tree(case.old_rev)
    corpus(root / "corpus.txt")
    rows = []
    for label, code in (("new", REPO), ("old", old)):
        if code is None:
            continue
        plan_path = root / f"plan-{label}.json"
        plan(code, spec, plan_path)
        pin(code, plan_path, case.pin)
        out = root / f"out-{label}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        result = launch(code, plan_path, out, timeout)
        rows.append({"case": case.name, "code": label, "predicted": predicted(plan_path), **result})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("predicted", "timeline_mib")}), flush=True)
    return rows


def teacher_bytes(teacher: Path) -> int:
    return sum(p.stat().st_size for p in teacher.glob("*.safetensors"))


def student_share(host: dict) -> int:
    """What a rank holds besides the teacher at its predicted peak (student, runtime, buffers: every item of
    the peak phase that is not the teacher's), so that the bound reads: the teacher costs a rank < 0.6 x T."""
    if not host:
        return 0
    phase = max(host["phases"], key=host["phases"].get)
    return sum(i["bytes"] for i in host["items"][phase] if "teacher:" not in i["name"])


def report(rows: list[dict], teacher: Path) -> bool:
    t_bytes = teacher_bytes(teacher)
    print(f"\nteacher {t_bytes / GiB:.2f} GiB; per rank: predicted host peak (plan), measured VmHWM and peak RssAnon "
          f"(sampled from outside), ratio measured/predicted, bound 0.6 x teacher + student share")
    head = f"{'case':12} {'code':4} {'rank':4} {'teacher':9} {'zero':4} {'predicted':>9} {'VmHWM':>7} {'RssAnon':>7} " \
           f"{'ratio':>6} {'bound':>6} {'ok':>3} {'saved':>5} {'s':>5}"
    print(head)
    ok = True
    new = {r["case"]: r for r in rows if r["code"] == "new"}
    for r in rows:
        pred = r["predicted"]
        for rank in (0, 1):
            peaks = r["peaks"].get(str(rank), r["peaks"].get(rank, {}))
            host = (new[r["case"]]["predicted"]["host"] if r["case"] in new else pred["host"])
            host = host.get(str(rank), host.get(rank, {}))
            share = student_share(host)
            p_host = host.get("peak", 0)
            hwm, anon = peaks.get("VmHWM", 0), peaks.get("RssAnon", 0)
            ratio = hwm / p_host if p_host else float("nan")
            bound = 0.6 * t_bytes + share
            good = abs(ratio - 1) <= TOLERANCE and hwm < bound and r["finished"] == 2 and r["saved"]
            if r["code"] == "new":
                ok &= good
            print(f"{r['case']:12} {r['code']:4} {rank:4} {pred['placement']['teacher_strategy']['t']:9} "
                  f"{pred['placement']['zero_stage']:4} {p_host / GiB:9.2f} {hwm / GiB:7.2f} {anon / GiB:7.2f} "
                  f"{ratio:6.2f} {bound / GiB:6.2f} {'yes' if good else 'no':>3} {str(r['saved']):>5} "
                  f"{r['seconds']:5.0f}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="sharded,zero3,cpu_offload,zero3_vocab")
    ap.add_argument("--teacher", type=Path, default=WORK / "teacher")
    ap.add_argument("--old-rev", default=OLD_REV, help="commit of the old runtime ('' to skip the old path)")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--report", action="store_true", help="print the table of the last results.json again")
    args = ap.parse_args()
    if args.report:
        return 0 if report(json.loads((WORK / "results.json").read_text()), args.teacher) else 1
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not (args.teacher / "config.json").exists():
        sys.path[:0] = [str(REPO), str(REPO / "bench")]
        from make_teacher import make

        make(args.teacher, layers=32, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
    old = old_tree(args.old_rev) if args.old_rev else None
    rows = []
    for name in args.cases.split(","):
        rows += run_case(CASES[name], args.teacher, old, args.timeout)
    path = WORK / "results.json"
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["case"] not in args.cases.split(",")]
    rows = kept + rows  # earlier cases' results stay, so the table can be built case by case under the lock
    path.write_text(json.dumps(rows, indent=1))
    return 0 if report(rows, args.teacher) else 1


if __name__ == "__main__":
    sys.exit(main())
