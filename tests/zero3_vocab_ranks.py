"""Two-rank check run by tests/test_zero3_student.py through the deepspeed launcher: a pretrained ZeRO-3 student
with a compressed (GLMD) vocabulary, ranked from the teacher or from itself, is built by ``build_models``
partitioned at its kept rows, streamed from its safetensors files. Per plan it writes each rank's peak resident
memory while the student is built (VmHWM, reset first), whether every parameter is partitioned, and on rank 0
the largest difference from the whole-built path (the student loaded whole in fp32, its vocabulary map made
from the whole source's embeddings, then ``compress_student``).

argv: out_json plan_json [plan_json ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_ranks import _grown, _reset_peak  # noqa: E402  (the same VmHWM reset and reading)


def _env(plan_path: Path, rank: int, world: int):
    from planner.plan import Plan
    from runtime.recipe import _RunEnv
    from runtime.stagemodels import Placing

    plan = Plan.model_validate_json(plan_path.read_text())
    env = _RunEnv(plan, plan_path.parent, plan_path.parent / "out", rank, world, False, False, None)
    env.placing = Placing(zero3={"s": plan.stages[0].deepspeed_config})
    return env


def _warm_up(env, plans: list[Path]) -> None:
    """The first partitioned build and gathers import torch._dynamo and the model code, the first vocabulary map
    the data and tokenizer code (~100 MB, not a copy): done once beforehand, on envs thrown away."""
    from gkdlang.spec import InitSpec
    from runtime import engine as eng
    from runtime import models as M
    from runtime.stagemodels import build_vocab_map

    for path in plans:
        build_vocab_map(_env(path, env.rank, env.world), "s", {})

    spec = env.plan.spec.models["s"]
    arch = spec.arch.model_copy(update={"num_layers": 1, "vocab_size": 64,
                                        "config": {**spec.arch.config, "num_hidden_layers": 1, "vocab_size": 64}})
    small = spec.model_copy(update={"arch": arch, "init": InitSpec(kind="random"), "vocab": None})
    net = M.build_student_partitioned(small, env.placing.zero3["s"])
    dict(eng.gathered_tensors(M.named_tensors(net), torch.float32))
    M.load_tokenizer(spec, env.plan.spec.models, env.base_dir)


def _whole(env, vmap) -> tuple[dict[str, torch.Tensor], bool]:
    """The whole-built path's student and whether its vocabulary map equals ``vmap``."""
    from runtime import models as M
    from runtime import vocab as V

    spec = env.plan.spec
    vocab = spec.vocabs["s"]
    student = M.build_model(spec.models["s"], env.base_dir, {}).float()
    source = student if vocab.source == "s" else M.build_model(spec.models[vocab.source], env.base_dir, {})
    embeddings = source.get_input_embeddings().weight.detach().float()
    unk = M.load_tokenizer(spec.models["s"], spec.models, env.base_dir).unk_token_id
    want = V.build_vocab_map(vocab, vmap.kept_ids.tolist(), embeddings, unk)
    V.compress_student(student, want)
    return {k: v.detach() for k, v in M.named_tensors(student)}, torch.equal(want.old_to_new, vmap.old_to_new)


def main(out_json: str, *plans: str) -> None:
    from runtime import engine as eng
    from runtime import models as M
    from runtime.stagemodels import build_models

    rank, world = eng.prepare_process()
    envs = [_env(Path(p), rank, world) for p in plans]
    _warm_up(envs[0], [Path(p) for p in plans])
    eng.barrier()
    result: dict = {"rank": rank, "world": world, "plans": []}
    kept = []  # every build stays alive: memory freed by one cannot hide the next one's
    for env in envs:
        spec = env.plan.spec
        stage = spec.stages[0]
        start = _reset_peak()
        models = build_models(env, stage, [], {})
        grown = _grown(start)
        student, vmap = models.modules["s"], models.vocab_maps["s"]
        kept.append(models)
        got = dict(eng.gathered_tensors(M.named_tensors(student), torch.float32))
        row = {"source": spec.vocabs["s"].source, "student_build": grown,
               "partitioned": all(eng.is_partitioned(p) and p.numel() == 0 for p in student.parameters()),
               "compressed_bytes": 4 * sum(math.prod(eng.full_shape(p)) for p in student.parameters()),
               "rows": vmap.size}
        if rank == 0:
            want, same_map = _whole(env, vmap)
            row.update(keys_equal=sorted(want) == sorted(got), same_map=same_map,
                       max_abs_diff=max(float((got[k] - want[k]).abs().max()) for k in want))
        result["plans"].append(row)
        eng.barrier()
    Path(out_json).with_name(f"{Path(out_json).stem}-rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
