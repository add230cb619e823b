"""The gkdc command line: check, fmt, plan, graph, cache, run. The composition root over gkdlang, planner, runtime.

``check``, ``fmt``, ``plan`` and ``graph`` import no torch or deepspeed (tests/test_imports.py); ``run``
imports the runtime lazily. Every user error ends as a message and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gkdc import __version__

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gkdc", description="A compiler for knowledge-distillation plans.")
    p.add_argument("--version", action="version", version=f"gkdc {__version__}")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("check", help="parse and check specs against the real architectures")
    c.add_argument("files", nargs="+", type=Path)
    c.add_argument("--format", choices=("text", "json", "github"), default="text")
    c.add_argument("--no-plan", action="store_true", help="skip the memory feasibility check")
    _add_spec_options(c)
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="format specs canonically")
    f.add_argument("files", nargs="+", type=Path)
    f.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted, write nothing")
    f.add_argument("--stdout", action="store_true", help="print instead of rewriting in place")
    f.set_defaults(func=cmd_fmt)

    pl = sub.add_parser("plan", help="plan a spec: signal graph, memory, placement, DeepSpeed configs")
    pl.add_argument("file", type=Path, nargs="?")
    pl.add_argument("-o", "--output", type=Path, help="write the plan JSON here ('-': to stdout)")
    pl.add_argument("--explain", action="store_true", help="say why each choice was made")
    pl.add_argument("--format", choices=("text", "json", "github"), default="text", help="diagnostics format")
    pl.add_argument("--schema", action="store_true", help="print the plan's JSON Schema and exit")
    _add_spec_options(pl)
    pl.set_defaults(func=cmd_plan)

    g = sub.add_parser("graph", help="write the signal graph as .dot (or .svg/.png with Graphviz)")
    g.add_argument("file", type=Path)
    g.add_argument("-o", "--output", type=Path, required=True)
    _add_spec_options(g)
    g.set_defaults(func=cmd_graph)

    e = sub.add_parser("eval", help="held-out perplexity or accuracy of saved models (e.g. runs/x/models/*)")
    e.add_argument("models", nargs="+", type=Path, help="model folders saved by gkdc run (or any HF folder)")
    e.add_argument("--data", type=Path, required=True, help="held-out text (one example per line) or jsonl")
    e.add_argument("--seq-len", type=int, default=128)
    e.add_argument("--limit", type=int, default=None, help="score only the first N lines")
    e.add_argument("--json", type=Path, default=None, help="also write the results here")
    e.set_defaults(func=cmd_eval)

    ca = sub.add_parser("cache", help="precompute the signals of teachers that declare `cache: topk(...)`")
    ca.add_argument("file", type=Path, help="spec.gkd")
    ca.add_argument("--stage", default=None, help="only this stage (default: every stage reading a cached teacher)")
    ca.add_argument("--out", type=Path, default=None, help="write under DIR/<stage> instead of the spec's cache path")
    _add_spec_options(ca)
    ca.set_defaults(func=cmd_cache)

    r = sub.add_parser("run", help="execute a plan (or a spec, planning it first) with DeepSpeed")
    r.add_argument("file", type=Path, help="plan.json or spec.gkd")
    r.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<spec name>)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    r.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps (smoke runs)")
    r.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub to run")
    r.add_argument("--allow-pickle", action="store_true", help="allow loading .bin (pickle) weights")
    r.add_argument("--overwrite", action="store_true",
                   help="remove a previous run's outputs from --out first and start again (the plan is kept)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar: a plain line every --log-every steps")
    r.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="steps between plain progress lines (default: about 20 per stage)")
    r.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases, offline, under <out>/wandb (needs pip install 'gkdc[wandb]')")
    r.add_argument("--hostfile", type=Path, default=None, metavar="FILE",
                   help="several nodes: DeepSpeed hostfile (`host slots=N` a line), checked against the plan")
    r.add_argument("--node-rank", type=int, default=None, metavar="R",
                   help="several nodes: run node R's ranks here (start `gkdc run` on every node; docs/runtime.md)")
    r.add_argument("--master-addr", default=None, metavar="ADDR", help="several nodes: node 0's address")
    r.add_argument("--master-port", type=int, default=None, metavar="PORT",
                   help="several nodes: the ranks' rendezvous port (the launchers use PORT+1)")
    _add_spec_options(r)
    r.set_defaults(func=cmd_run)
    return p


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that reads a spec: --allow-path and --set."""
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR", dest="allow_path",
                   help="also allow data and cache paths under DIR (repeatable; see docs/security.md)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
                   help="change a spec value before checking, e.g. stage.train.steps=100 or cluster.cpu_memory=64GiB "
                        "(repeatable; recorded in the plan; see docs/language.md)")


# ---------------------------------------------------------------- check / fmt


def _emit(diags, sources, fmt: str, stream=None, machine=None) -> None:
    """Diagnostics: text on ``stream`` (stderr), json / github on ``machine`` (stdout unless it carries a plan)."""
    from gkdlang.diagnostics import render_github, render_json, render_text

    stream = stream or sys.stderr  # looked up per call: callers may redirect stderr
    machine = machine or sys.stdout

    if not diags:
        return
    if fmt == "json":
        print(render_json(diags), file=machine)
    elif fmt == "github":
        print(render_github(diags), file=machine)
    else:
        print(render_text(diags, sources), file=stream)


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _check_one(path: Path, with_plan: bool, allowed: list[str] | tuple[str, ...] = (),
               overrides: list[str] | tuple[str, ...] = ()):
    """(diagnostics, sources, spec) for one file, including the planner's feasibility check; ``overrides``: the
    ``--set`` texts (gkdlang.overrides)."""
    from gkdlang.diagnostics import Diagnostic
    from gkdlang.lower import check_file

    if not _is_file(path):
        return [Diagnostic("file-not-found", f"no such file: {_short(_display(path))}", None)], {}, None
    result = check_file(path, display_name=_display(path), allowed_paths=allowed, overrides=overrides)
    diags = list(result.diagnostics)
    if result.spec is not None and with_plan:
        plan, plan_diags = _build_plan(result.spec, path)
        diags.extend(plan_diags)
        return diags, result.sources, result.spec if plan is not None else None
    return diags, result.sources, result.spec


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL
        return False


def _short(text: str, width: int = 120) -> str:
    return text if len(text) <= width else text[: width // 2] + "..." + text[-width // 2 + 3:]


def cmd_check(args) -> int:
    all_diags, sources, failed = [], {}, 0
    for path in args.files:
        diags, srcs, spec = _check_one(path, not args.no_plan, args.allow_path, args.overrides)
        sources.update(srcs)
        all_diags.extend(diags)
        errors = sum(1 for d in diags if d.severity == "error")
        failed += errors > 0
        if args.format == "text":
            _emit(diags, srcs, "text")
            status = "ok" if not errors else f"{errors} error{'s' * (errors != 1)}"
            print(f"{_short(_display(path))}: {status}", file=sys.stderr)
    if args.format == "json":  # a clean run prints [] so a CI step can always parse stdout
        from gkdlang.diagnostics import render_json

        print(render_json(all_diags))
    elif args.format != "text":
        _emit(all_diags, sources, args.format)
    return EXIT_ERRORS if failed else EXIT_OK


def cmd_fmt(args) -> int:
    from gkdlang.fmt import format_source
    from gkdlang.parser import ParseError

    changed = 0
    for path in args.files:
        try:
            text = path.read_text(encoding="utf-8")
            out = format_source(text, _display(path))
        except OSError as exc:
            print(f"{_short(str(path))}: {exc.strerror}", file=sys.stderr)
            return EXIT_ERRORS
        except UnicodeDecodeError as exc:
            print(f"{_short(str(path))}:1:1: error: file is not UTF-8 (byte {exc.start})  [syntax-unexpected-char]",
                  file=sys.stderr)
            return EXIT_ERRORS
        except ParseError as exc:
            _emit([exc.diagnostic], {_display(path): text}, "text")
            return EXIT_ERRORS
        if args.stdout:
            sys.stdout.write(out)
        elif out != text:
            changed += 1
            if args.check:
                print(f"{_display(path)}: would reformat", file=sys.stderr)
            else:
                _atomic_write(path, out)
    return EXIT_ERRORS if args.check and changed else EXIT_OK


# ---------------------------------------------------------------- plan / graph


def _build_plan(spec, path: Path, plan_path: Path | None = None):
    """(plan or None, diagnostics): the planner's failures become diagnostics with the cluster's span."""
    from gkdlang.diagnostics import Diagnostic
    from planner.build import PlanFailure, build_plan, plan_warnings

    target = str(plan_path) if plan_path is not None else "plan.json"
    result = build_plan(spec, gkdc_version=__version__, spec_path=str(path), plan_path=target)
    if isinstance(result, PlanFailure):
        diags = [d if isinstance(d, Diagnostic) else Diagnostic(*d) for d in result.diagnostics]
        return None, diags
    return result, plan_warnings(result)  # warnings only: the plan stands


def cmd_plan(args) -> int:
    if args.schema:
        from planner.schema import plan_json_schema

        print(json.dumps(plan_json_schema(), indent=2))
        return EXIT_OK
    if args.file is None:
        print("gkdc plan: error: a spec file is required (or --schema)", file=sys.stderr)
        return EXIT_USAGE
    # the plan JSON goes to stdout with `-o -`, or with --format json and no -o; machine diagnostics then go to stderr
    to_stdout = (args.output is not None and str(args.output) == "-") or (args.output is None and args.format == "json")
    machine = sys.stderr if to_stdout else None
    output = None if to_stdout else args.output
    diags, sources, spec = _check_one(args.file, with_plan=False, allowed=args.allow_path, overrides=args.overrides)
    _emit(diags, sources, args.format, machine=machine)
    if spec is None:
        return EXIT_ERRORS
    plan, plan_diags = _build_plan(spec, args.file.resolve(), output)
    _emit(plan_diags, sources, args.format, machine=machine)
    if plan is None:
        return EXIT_ERRORS
    from planner.report import render_report

    if to_stdout:
        print(plan.model_dump_json(indent=2))
    elif args.format == "text":
        print(render_report(plan, explain=args.explain))
    if output:
        _atomic_write(output, plan.model_dump_json(indent=2) + "\n")
        print(f"wrote {output}", file=sys.stderr)
    return EXIT_OK


def cmd_graph(args) -> int:
    from planner.graph import GraphRenderError, build_graph, render

    diags, sources, spec = _check_one(args.file, with_plan=False, allowed=args.allow_path, overrides=args.overrides)
    _emit(diags, sources, "text")
    if spec is None:
        return EXIT_ERRORS
    try:
        render(build_graph(spec), args.output)
    except GraphRenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- run


def cmd_run(args) -> int:
    from planner.plan import Plan

    path: Path = args.file
    if args.resume and args.overwrite:
        print("error: --resume continues a run and --overwrite starts it again; give one of them", file=sys.stderr)
        return EXIT_USAGE
    if args.log_every is not None and args.log_every < 1:
        print("error: --log-every must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if not _is_file(path):
        print(f"error: no such file: {_short(str(path))}", file=sys.stderr)
        return EXIT_USAGE
    if path.suffix == ".gkd":
        diags, sources, spec = _check_one(path, with_plan=False, allowed=args.allow_path, overrides=args.overrides)
        _emit(diags, sources, "text")
        if spec is None:
            return EXIT_ERRORS
        out = args.out or Path("runs") / path.stem
        if not (args.resume or args.overwrite) and (out / "checkpoints" / "progress.json").exists():
            # refused before its plan.json is replaced by this spec's
            print(f"error: {out} already holds a run; pass --resume to continue it, --overwrite to start it again "
                  "from scratch, or choose another --out", file=sys.stderr)
            return EXIT_ERRORS
        plan_path = out / "plan.json"
        plan, plan_diags = _build_plan(spec, path.resolve(), plan_path)
        _emit(plan_diags, sources, "text")
        if plan is None:
            return EXIT_ERRORS
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(plan_path, plan.model_dump_json(indent=2) + "\n")
    elif args.overrides:
        print(f"error: --set changes a spec, and {_short(str(path))} is a plan; re-plan the spec with --set",
              file=sys.stderr)
        return EXIT_USAGE
    else:
        plan_path = path
        try:
            plan = Plan.model_validate_json(path.read_text(encoding="utf-8"))
        except Exception as exc:  # pydantic / JSON errors: the boundary where they become a message
            return _plan_load_error(path, exc)
        out = args.out or Path("runs") / Path(plan.spec_file).stem
    _run_logging_env(args)
    _warn_device(plan)
    from runtime.errors import RunError
    from runtime.launch import run_plan
    from runtime.multinode import NodeOptions

    try:
        run_plan(plan, plan_path, out, resume=args.resume, max_steps=args.max_steps,
                 trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                 progress=not args.no_progress, allowed_paths=tuple(args.allow_path), overwrite=args.overwrite,
                 nodes=NodeOptions(args.hostfile, args.node_rank, args.master_addr, args.master_port))
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


def _run_logging_env(args) -> None:
    """The run's logging options reach every rank through the environment (the launcher passes it on)."""
    from runtime.metrics import LOG_EVERY_ENV, WANDB_ENV

    if args.log_every is not None:
        os.environ[LOG_EVERY_ENV] = str(args.log_every)
    if args.wandb:
        os.environ[WANDB_ENV] = "offline"


def _warn_device(plan) -> None:
    """A plan made for GPUs run where there is none (or the reverse) runs, but its figures are not this machine's."""
    from planner.report import mismatch_warning

    message = mismatch_warning(plan.spec.cluster.gpu, _cuda_devices())
    if message:
        print(f"warning: {message}  [device-mismatch]", file=sys.stderr)


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cmd_cache(args) -> int:
    """Write (or resume) the caches; ranks come from RANK / WORLD_SIZE when a launcher starts several."""
    from planner.graph import build_graph

    diags, sources, spec = _check_one(args.file, with_plan=False, allowed=args.allow_path, overrides=args.overrides)
    _emit(diags, sources, "text")
    if spec is None:
        return EXIT_ERRORS
    from runtime import cache
    from runtime.errors import RunError

    graph = build_graph(spec)
    captures = {st.name: graph.captures(st) for st in spec.stages}
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        jobs = cache.jobs_for(spec, captures, args.file.resolve().parent, stage=args.stage, out=args.out)
        for job in jobs:
            res = cache.write_cache(job, rank=rank, world=world)
            state = "complete" if res.complete else "partial (other ranks write the rest)"
            print(f"{_display(res.directory)}: teacher '{job.teacher}', stage '{job.stage.name}': wrote "
                  f"{res.shards_written} shard(s), kept {res.shards_skipped}; {res.bytes / 1e6:.1f} MB for "
                  f"{res.tokens:,} tokens ({res.bytes / max(res.tokens, 1):.0f} B/token); {state}", file=sys.stderr)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


def cmd_eval(args) -> int:
    from runtime.errors import RunError
    from runtime.evaluate import evaluate

    results = []
    for folder in args.models:
        try:
            results.append(evaluate(folder, args.data, seq_len=args.seq_len, limit=args.limit))
        except RunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERRORS
    _eval_table(results)
    if args.json:
        _atomic_write(args.json, json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return EXIT_OK


def _eval_table(results) -> None:
    """The results as a rich table (box drawing on a terminal, ASCII in files and pipes), like the plan report."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    table = Table(box=box.HEAVY_HEAD if tty else box.ASCII)
    for col in ("model", "metric", "value", "scored", "params", "embedding", "note"):
        table.add_column(col, justify="right" if col in ("value", "scored", "params", "embedding") else "left")
    for r in results:
        table.add_row(r.model, r.metric, f"{r.value:.3f}", str(r.count), f"{r.parameters:,}",
                      f"{r.embedding_parameters:,}", r.note)
    Console(force_terminal=tty, no_color=not tty, width=None if tty else 120, highlight=False).print(table)


def _plan_load_error(path: Path, exc: Exception) -> int:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as jexc:
        print(f"error: {path} is not a plan (invalid JSON: {jexc})", file=sys.stderr)
        return EXIT_ERRORS
    from planner.plan import PLAN_SCHEMA_VERSION

    version = raw.get("plan_schema_version") if isinstance(raw, dict) else None
    if version != PLAN_SCHEMA_VERSION:
        print(f"error: {path} has plan schema version {version!r}; this gkdc reads version {PLAN_SCHEMA_VERSION}. "
              "Re-plan the spec with this gkdc.", file=sys.stderr)
        return EXIT_ERRORS
    errors = getattr(exc, "errors", lambda: [])()
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:3]) or str(exc)
    print(f"error: {path} is not a valid plan: {detail}", file=sys.stderr)
    return EXIT_ERRORS


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted write never leaves half a file."""
    from runtime.files import atomic_write  # torch-free

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


if __name__ == "__main__":
    sys.exit(main())
