"""Two-rank check run by tests/test_scale.py through the deepspeed launcher: a teacher built into its ZeRO-3
partitions gives the replicated teacher's signals, and no rank materialises a whole teacher or a whole fp32
student while building, loading or saving (peak resident memory, reset before each phase, from /proc).

argv: teacher_dir student_dir out_json [whole | vocab | vocab-whole]  (``whole``: the old whole-copy path, which
must fail the check; ``vocab``: a ZeRO-3 student with a compressed vocabulary copying its init from the teacher,
built at the compressed size, against the whole-built path; ``vocab-whole``: that student built whole)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the RSS it starts from."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _grown(start: int) -> int:
    return _status("VmHWM") - start


def main(teacher_dir: str, student_dir: str, out_json: str, mode: str = "partitioned") -> None:
    from safetensors.torch import load_file

    from gkdlang.arch import arch_from_config
    from gkdlang.spec import HeadSpec, ModelSpec, Span
    from planner.plan import CapturePoint, ModelCapture
    from runtime import engine as eng
    from runtime import models as M
    from runtime.adapters import capture

    rank, world = eng.prepare_process()
    whole = mode == "whole"  # the pre-issue-11 path, to show the check catches it
    span = Span(file="x.gkd", line=1, col=1, end_line=1, end_col=2)
    cfg = json.loads((Path(teacher_dir) / "config.json").read_text())
    spec = ModelSpec(name="t", role="teacher", source_kind="local", source=teacher_dir, arch=arch_from_config(cfg),
                     dtype="fp32", span=span)
    zero3 = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "steps_per_print": 10**9, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    teacher_bytes = sum(p.stat().st_size for p in Path(teacher_dir).glob("*.safetensors"))
    points = ModelCapture(model="t", points=[CapturePoint(kind="logits"), CapturePoint(kind="hidden", layer=1),
                                             CapturePoint(kind="hidden", layer=3)], stop_after_layer=None,
                          needs_head=True)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg["vocab_size"], (2, 16)),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    result: dict = {"rank": rank, "world": world, "teacher_bytes": teacher_bytes}

    # warm-up: the first partitioned build imports torch._dynamo and the model code (~100 MB, not a copy)
    warm = M.build_teacher(spec, Path("."), keep_blocks=1, drop_head=True, zero3=zero3)
    result["pruned_blocks"] = len(warm.model.layers)
    result["pruned_head"] = type(warm.get_output_embeddings()).__name__
    result["pruned_params"] = sum(p.ds_numel for p in warm.parameters())
    del warm

    # phases measured in order, each one's memory kept alive, so freed memory cannot hide the next one's
    start = _reset_peak()
    net = M.build_teacher(spec, Path("."), keep_blocks=None, drop_head=False, zero3=None if whole else zero3)
    teacher = eng.init_teacher(net, zero3, name="t", stage="check")
    result["teacher_build"] = _grown(start)
    result["teacher_partitioned"] = all(eng.is_partitioned(p) and p.numel() == 0 for p in net.parameters())
    start = _reset_peak()
    sharded = {k: v.clone() for k, v in capture(teacher, batch, points, grad=False).items()}
    result["teacher_forward"] = _grown(start)

    s_cfg = json.loads((Path(student_dir) / "config.json").read_text())
    s_spec = ModelSpec(name="s", role="student", source_kind="derived", source=None, base="t",
                       arch=arch_from_config(s_cfg), dtype="fp32", frozen=False, head=HeadSpec(kind="lm"), span=span)
    result["student_bytes"] = sum(p.stat().st_size for p in Path(student_dir).glob("*.safetensors"))
    start = _reset_peak()
    if whole:  # the old path: each rank builds the whole fp32 student and loads the whole file into it
        student = M.build_model(s_spec, Path("."), {}).float()
        student.load_state_dict(load_file(str(Path(student_dir) / "model.safetensors")))
        student = eng.init_teacher(student, zero3, name="s", stage="check").module
    else:
        student = M.build_student_partitioned(s_spec, zero3)
        M.load_weights(student, Path(student_dir), "s")  # the stage hand-off: weights into the partitions
    result["student_build_load"] = _grown(start)
    start = _reset_peak()
    saved = M.write_weights(student, Path(out_json).with_suffix(".safetensors"), rank=rank)
    result["student_save"] = _grown(start)
    result["saved"] = str(saved) if saved else None
    eng.release(teacher)
    del teacher, net

    plain = M.build_teacher(spec, Path("."), keep_blocks=None, drop_head=False, zero3=None)
    replicated = capture(plain, batch, points, grad=False)
    result["max_abs_diff"] = {str(k): float((sharded[k] - replicated[k]).abs().max()) for k in replicated}
    Path(out_json).with_name(f"{Path(out_json).stem}-rank{rank}.json").write_text(json.dumps(result, indent=1))


def _pruned(spec):
    """The one-block model of ``spec`` (a warm-up build)."""
    arch = spec.arch.model_copy(update={"num_layers": 1, "config": {**spec.arch.config, "num_hidden_layers": 1}})
    return spec.model_copy(update={"arch": arch})


def vocab_student(teacher_dir: str, out_json: str, mode: str) -> None:
    """A ZeRO-3 student with a GLMD-compressed vocabulary, init copied from the teacher: its build's peak memory
    (``vocab``: partitioned at the compressed size, as runtime/stagemodels.py builds it; ``vocab-whole``: whole
    at the full size, then compressed and partitioned) and, on rank 0, its largest difference from the whole
    build."""
    from types import SimpleNamespace

    from gkdlang.arch import arch_from_config
    from gkdlang.spec import HeadSpec, InitSpec, ModelSpec, Span
    from runtime import engine as eng
    from runtime import models as M
    from runtime import stagemodels as SM
    from runtime import vocab as V

    rank, world = eng.prepare_process()
    span = Span(file="x.gkd", line=1, col=1, end_line=1, end_col=2)
    cfg = json.loads((Path(teacher_dir) / "config.json").read_text())
    t_spec = ModelSpec(name="t", role="teacher", source_kind="local", source=teacher_dir, arch=arch_from_config(cfg),
                       dtype="fp32", span=span)
    teacher = M.build_teacher(t_spec, Path("."), keep_blocks=None, drop_head=False, zero3=None)
    with torch.no_grad():  # its weights may be mapped from the file: make them resident before measuring
        for p in teacher.parameters():
            p.data = p.data.clone()
    full, keep = int(cfg["vocab_size"]), int(cfg["vocab_size"]) // 4
    kept = torch.randperm(full, generator=torch.Generator().manual_seed(1))[:keep]
    old_to_new = torch.zeros(full, dtype=torch.long)
    old_to_new[kept] = torch.arange(keep)
    vmap = V.VocabMap(name="v", remap="nearest", kept_ids=kept, old_to_new=old_to_new)
    s_cfg = {**cfg, "vocab_size": keep}  # the planner's arch holds the kept rows
    s_spec = ModelSpec(name="s", role="student", source_kind="derived", source=None, base="t", vocab="v",
                       arch=arch_from_config(s_cfg), dtype="fp32", frozen=False, head=HeadSpec(kind="lm"),
                       init=InitSpec(kind="copy", source="t"), span=span)
    zero3 = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "steps_per_print": 10**9, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    env = SimpleNamespace(trust_remote_code=False, allow_pickle=False, base_dir=Path("."),
                          vocab_map=lambda name, built: vmap)
    result: dict = {"rank": rank, "student_bytes": 4 * sum(
        (keep if p.shape[0] == full else p.shape[0]) * p[0].numel() for p in teacher.parameters())}
    # warm-up: the first partitioned build and gathers import torch._dynamo and the model code (not a copy)
    at_full = SM._vocab_of_copy_source(s_spec, teacher)
    warm = SM._build_partitioned(env, _pruned(at_full), zero3, {"t": teacher})
    dict(eng.gathered_tensors(M.named_tensors(warm), torch.float32))
    del warm
    eng.barrier()
    start = _reset_peak()
    if mode == "vocab-whole":  # the path before: whole and fp32 on every rank, compressed, then partitioned
        student = M.build_model(at_full, Path("."), {"t": teacher}).float()
        V.compress_student(student, vmap)
        student = eng.init_teacher(student, zero3, name="s", stage="check").module
    else:
        student = SM._build_partitioned(env, at_full, zero3, {"t": teacher})
    result["student_build"] = _grown(start)
    result["partitioned"] = all(eng.is_partitioned(p) and p.numel() == 0 for p in student.parameters())
    got = dict(eng.gathered_tensors(M.named_tensors(student), torch.float32))
    if rank == 0:
        want = M.build_model(at_full, Path("."), {"t": teacher}).float()
        V.compress_student(want, vmap)
        ref = dict(M.named_tensors(want))
        result["keys_equal"] = sorted(ref) == sorted(got)
        result["max_abs_diff"] = max(float((got[k] - ref[k].detach()).abs().max()) for k in ref)
        result["rows"] = list(got["model.embed_tokens.weight"].shape)
    Path(out_json).with_name(f"{Path(out_json).stem}-rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if args[3:4] in (["vocab"], ["vocab-whole"]):
        vocab_student(args[0], args[2], args[3])
    else:
        main(*args)
