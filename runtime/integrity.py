"""What ``gkdc run`` checks in a plan before it reads anything else: a plan is input, and anyone may have written it.

- its integrity digest (``planner.plan.plan_digest``) matches its content: an edited plan is refused, whatever
  field was edited (the embedded spec, a stage, a placement, a DeepSpeed config);
- it is self-consistent: one stage plan per spec stage, in order; the world size is the cluster's;
- its DeepSpeed configs hold only the sections the planner writes, with no file paths but the planner's NVMe
  folder (DeepSpeed writes monitors, profiles and swap files where a config says);
- every data and cache path of the embedded spec lies inside an allowed root (``gkdlang.paths``), matched
  files included (a link out of the project is refused).

The launch command is never read from the plan (``runtime.launch.launch_argv`` builds it).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Iterable

from planner.plan import Plan, plan_digest
from runtime.errors import RunError

#: top-level DeepSpeed sections the planner writes (planner/dsconfig.py); anything else is refused
DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
           "steps_per_print", "wall_clock_breakdown", "bf16", "fp16", "zero_optimization",
           "zero_force_ds_cpu_optimizer", "activation_checkpointing"}


def verify_plan(plan: Plan, plan_path: Path, base_dir: Path, allowed_paths: Iterable[str] = ()) -> None:
    """Raise a RunError naming the first problem; return when the plan may run."""
    where = str(plan_path)
    if not plan.integrity:
        raise RunError(f"{where} has no integrity digest (written by hand or by an older gkdc); re-run `gkdc plan`")
    if plan_digest(plan) != plan.integrity:
        raise RunError(f"{where} was edited after `gkdc plan` wrote it (its content no longer matches its "
                       "integrity digest); re-run `gkdc plan` on the spec instead of editing the plan")
    names = [s.name for s in plan.spec.stages]
    if [s.name for s in plan.stages] != names:
        raise RunError(f"{where}: its stage plans {[s.name for s in plan.stages]} do not match the spec's stages "
                       f"{names}; re-run `gkdc plan`")
    cluster = plan.spec.cluster
    if plan.world_size != cluster.nodes * cluster.gpus_per_node or plan.world_size < 1:
        raise RunError(f"{where}: world_size {plan.world_size} is not the cluster's {cluster.nodes} x "
                       f"{cluster.gpus_per_node}; re-run `gkdc plan`")
    from runtime.adapters.families import ADAPTERS

    for m in plan.spec.models.values():
        if m.arch.model_type not in ADAPTERS:
            raise RunError(f"model '{m.name}' is a {m.arch.family} model ({m.arch.model_type}); gkdc plans this "
                           f"family but cannot run it yet (runnable: {', '.join(sorted(ADAPTERS))})")
    for stage in plan.stages:
        check_ds_config(stage.deepspeed_config, f"{where}: stage '{stage.name}'")
        for teacher, cfg in stage.teacher_configs.items():
            check_ds_config(cfg, f"{where}: stage '{stage.name}', teacher '{teacher}'")
    check_spec_paths(plan, base_dir, allowed_paths)


#: a spec file larger than this is not read to compare hashes (the front end refuses specs over 8 MiB characters,
#: at most 4 bytes each in UTF-8)
MAX_SPEC_BYTES = 32 << 20


def check_spec_origin(plan: Plan, plan_path: Path, spec_path: Path, allowed_paths: Iterable[str] = ()) -> None:
    """The spec the plan names is where its data paths are resolved from, so it must be the plan's own: when the
    file exists its text must have the plan's hash; when it does not, its folder must lie inside the plan's
    project or an allowed root (a plan naming ``/etc/x.gkd`` cannot make ``passwd`` a relative data path)."""
    from gkdlang.digest import spec_hash as spec_digest  # the front end's hash, without the parser

    if spec_path.is_file():
        try:
            raw = spec_path.read_bytes() if spec_path.stat().st_size <= MAX_SPEC_BYTES else None
            text = raw.decode("utf-8") if raw is not None else None
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or spec_digest(text, plan.spec.uses, plan.spec.overrides) != plan.spec_hash:
            raise RunError(f"{spec_path} changed since {plan_path} was made; re-run `gkdc plan {spec_path}`")
        return
    from gkdlang.paths import allowed_roots

    base = spec_path.parent.resolve()
    roots = allowed_roots(Path(plan_path).parent, allowed_paths)
    if not any(base == r or r in base.parents for r in roots):
        raise RunError(f"{plan_path} names the spec {spec_path}, which does not exist, in a folder outside the plan's "
                       f"project ({', '.join(map(str, roots))}); run the plan beside its spec or allow the folder "
                       "with --allow-path DIR")


def check_ds_config(cfg: dict[str, Any], where: str) -> None:
    from planner.dsconfig import NVME_PATH

    extra = sorted(set(cfg) - DS_KEYS)
    if extra:
        raise RunError(f"{where}: DeepSpeed config section(s) {extra} are not written by the planner; refused "
                       "(re-run `gkdc plan`)")
    for key, value in _walk(cfg):
        if key.endswith("_path") and value != NVME_PATH:
            raise RunError(f"{where}: DeepSpeed config sets {key} = {str(value)[:80]!r}; only the planner's "
                           f"{NVME_PATH} is accepted")


def _walk(cfg: Any, prefix: str = ""):
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _walk(v, str(k))
    elif isinstance(cfg, list):
        for v in cfg:
            yield from _walk(v, prefix)
    else:
        yield prefix, cfg


def check_spec_paths(plan: Plan, base_dir: Path, allowed_paths: Iterable[str] = ()) -> None:
    """The path rule on the plan's embedded spec (data globs and their matches, cache folders)."""
    from gkdlang.paths import allowed_roots, resolve_within, text_problem

    roots = allowed_roots(base_dir, allowed_paths)
    named = [("data", d.name, p) for d in plan.spec.data.values() for p in d.paths]
    named += [("cache", m.name, m.cache.path) for m in plan.spec.models.values() if m.cache is not None]
    for use, owner, text in named:
        problem = text_problem(text)
        if problem is not None:
            raise RunError(f"{use} path of '{owner}': {problem}")
        full, inside = resolve_within(text, base_dir, roots)
        if not inside:
            raise RunError(f"{use} path '{text[:200]}' of '{owner}' resolves to {full}, outside the allowed roots "
                           f"({', '.join(map(str, roots))}); allow its folder with --allow-path DIR")
        if use == "data":
            pattern = text if Path(text).is_absolute() else str(Path(base_dir) / text)
            for match in glob.iglob(pattern, recursive=True):
                real = Path(match).resolve()
                if not any(real == r or r in real.parents for r in roots):
                    raise RunError(f"data file {match} of '{owner}' is a link to {real}, outside the allowed roots")
