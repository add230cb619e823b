"""A stage's models, built where the plan places them: which blocks a pruned teacher keeps, which models are
partitioned while they are built (ZeRO-3), tensor-parallel teachers, a student's copied init, the GLMD vocabulary
map. Split out of runtime/recipe.py, which runs the stage around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gkdlang.spec import InitSpec, ModelSpec, StageSpec
from planner.plan import ModelCapture, StagePlan
from runtime import engine as eng
from runtime import tensor_parallel
from runtime.errors import RunError

RunEnv = Any
"""runtime.recipe._RunEnv (not imported: recipe imports this module)."""

@dataclass
class StageModels:
    """The models of one stage, built and (for carried-over models) loaded."""

    modules: dict[str, nn.Module]
    archs: dict[str, Any]
    tokenizer: Any
    """The student's tokenizer (full vocabulary; compressed ids come from the vocab map)."""
    vocab_maps: dict[str, Any] = field(default_factory=dict)
    """Student name -> its VocabMap, for students with a compressed vocabulary."""


@dataclass(frozen=True)
class Placing:
    """How the stage's models are built so they start where the plan puts them (set by ``setup_stage``)."""

    keep_blocks: dict[str, int] = field(default_factory=dict)
    """Teacher -> blocks it is built with (its forward stops after them and never reaches its head)."""
    zero3: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Model -> the ZeRO-3 config it is partitioned under while it is built (sharded / offloaded teachers,
    a ZeRO-3 student)."""
    tp: dict[str, int] = field(default_factory=dict)  # teacher -> tensor-parallel degree (built into its shards)


def _placing(stage: StageSpec, stage_plan: StagePlan, captures: Mapping[str, ModelCapture], used: list[str],
             whole: set[str]) -> Placing:
    keep = {}
    for name in used:
        cap = captures[name]
        if name not in whole and cap.stop_after_layer is not None and not cap.needs_head:
            keep[name] = cap.stop_after_layer + 1
    zero3 = {name: cfg for name, cfg in stage_plan.teacher_configs.items() if cfg}
    if stage_plan.placement.zero_stage == 3:
        zero3.update({name: stage_plan.deepspeed_config for name in stage.students})
    return Placing(keep, zero3, dict(stage_plan.placement.teacher_tp))


def build_models(
    env: RunEnv, stage: StageSpec, teachers: list[str], trained: Mapping[str, Path]
) -> StageModels:
    """The stage's used ``teachers`` first (a student may copy its init from one), then the student.

    Each is built where the plan puts it (``env.placing``): a pruned teacher with only its blocks, a sharded
    or offloaded teacher and a ZeRO-3 student partitioned while they are built. Weights a model got in an
    earlier stage are streamed from their file into it (into its partitions under ZeRO-3). A replicated
    student is built in fp32: DeepSpeed keeps the master weights and casts to the planned precision itself.
    """
    from runtime import models as M
    from runtime import vocab as V

    spec = env.plan.spec
    placing = env.placing
    copy_sources = {str(spec.models[n].init.source) for n in stage.students if spec.models[n].init.kind == "copy"}
    # teachers built partitioned draw random numbers (zero.Init initialises before loading): keep the students'
    # init the same whatever the teachers' placement
    with torch.random.fork_rng(devices=[]):
        built: dict[str, nn.Module] = {name: _build_teacher(env, name, placing, name in copy_sources)
                                       for name in teachers}
    for name in stage.students:
        model_spec = spec.models[name]
        if name in trained:  # its weights come from the earlier stage: skip copying an init that is overwritten
            model_spec = model_spec.model_copy(update={"init": InitSpec(kind="random")})
        elif model_spec.init.kind == "copy" and model_spec.init.source not in built:
            source = str(model_spec.init.source)
            built[source] = _copy_source(env, source, built, trained)
        if model_spec.init.kind == "copy":
            model_spec = _vocab_of_copy_source(model_spec, built[str(model_spec.init.source)])
        zero3 = placing.zero3.get(name)
        if zero3 is not None:
            built[name] = _build_partitioned(env, model_spec, zero3, built)
        else:
            built[name] = _build_one(env, model_spec, built).float()
    vocab_maps = {}
    for name in stage.students:
        if spec.models[name].vocab is not None:
            vmap = vocab_maps[name] = env.vocab_map(spec.models[name].vocab, built)
            # a derived student may already be built at the compressed size (its arch holds the kept rows); a
            # partitioned one always is, its rows in the map's order (even when it keeps every row)
            weight = built[name].get_input_embeddings().weight
            if not eng.is_partitioned(weight) and eng.full_shape(weight)[0] == vmap.full_size:
                V.compress_student(built[name], vmap)
    for name, path in trained.items():
        if name in built:
            M.load_weights(built[name], path, name)
    tokenizer = M.load_tokenizer(spec.models[_single_student(stage)], spec.models, env.base_dir)
    archs = {name: m.arch for name, m in spec.models.items()}
    return StageModels({k: built[k] for k in [*teachers, *stage.students]}, archs, tokenizer, vocab_maps)


def _vocab_of_copy_source(model_spec: ModelSpec, source: nn.Module) -> ModelSpec:
    """A compressed student (its arch holds the kept rows) copying a full-vocabulary model is built at the full
    size, so every row copies; the vocabulary step below then keeps its rows. Other models are unchanged."""
    rows = eng.full_shape(source.get_input_embeddings().weight)[0]
    if model_spec.vocab is None:
        return model_spec
    return _with_rows(model_spec, rows)


def _with_rows(model_spec: ModelSpec, rows: int) -> ModelSpec:
    if rows == model_spec.arch.vocab_size:
        return model_spec
    arch = model_spec.arch.model_copy(update={"vocab_size": rows, "config": {**model_spec.arch.config, "vocab_size": rows}})
    return model_spec.model_copy(update={"arch": arch})


def _build_partitioned(env: RunEnv, model_spec: ModelSpec, zero3: dict[str, Any], built: dict[str, nn.Module]) -> nn.Module:
    """A ZeRO-3 student partitioned while it is built, its copied init gathered one tensor pair at a time.

    A student with a compressed vocabulary is built at the compressed size, so no rank ever holds the whole
    fp32 student, with the values of the whole-built path (build whole, then ``compress_student``):

    - ``init: copy(src)``: its embedding and head rows are the kept rows of the source's (``copy_init`` ``rows``);
    - pretrained from local safetensors: streamed from its files, of the embedding / head only the kept rows;
    - a random-init student whose arch has the full vocabulary draws its compressed rows directly (the same
      distribution as drawing all rows and keeping some).

    Its vocabulary map is made first: from the source built already, or, when the source is this student and
    is pretrained from local files, from the one embedding tensor read from them. Where the kept rows can only
    come from a built full-vocabulary student (a hub or pickle student; a random one ranking its own rows by
    its own embeddings) that student is built partitioned at the full size first, the map made from its
    gathered embeddings, its values copied into the compressed one, and it is dropped: its share (1 / ranks)
    is held twice for a moment, never a whole copy.
    """
    from runtime import models as M

    if model_spec.vocab is None:
        return _built_partitioned(env, model_spec, zero3, built, None)
    plan = getattr(env, "plan", None)  # None: a caller whose env hands out its own vocabulary map (tests)
    vocab, name = None if plan is None else plan.spec.vocabs[model_spec.vocab], model_spec.name
    streamed = model_spec.init.kind == "pretrained" and M.streams_from_files(model_spec, env.base_dir)
    self_ranked = vocab is not None and vocab.source == name and vocab.remap != "unk" and \
        model_spec.vocab not in getattr(env, "vocab_maps", {})
    if vocab is None and model_spec.init.kind == "pretrained" and not streamed:
        raise RunError(f"model '{name}': its vocabulary's full size is not known here (no plan)")
    if (model_spec.init.kind == "pretrained" and not streamed) or (self_ranked and model_spec.init.kind != "pretrained"):
        full = _built_partitioned(env, _with_rows(model_spec, vocab.full_size), zero3, built, None)
        built[name] = full  # the vocabulary map's embeddings, when it ranks itself (gathered, one tensor)
        try:
            vmap = env.vocab_map(model_spec.vocab, built)
        finally:
            del built[name]
        net = M.build_student_partitioned(_with_rows(model_spec.model_copy(update={"init": InitSpec(kind="random")}),
                                                     vmap.size), zero3, trust_remote_code=env.trust_remote_code,
                                          base_dir=env.base_dir, allow_pickle=env.allow_pickle)
        M.copy_init(net, model_spec.model_copy(update={"init": InitSpec(kind="copy", source=name)}), {name: full},
                    rows=vmap.kept_ids)
        del full
        return net
    # a pretrained, streamed student ranking itself: build_vocab_map reads the one embedding tensor from its files
    return _built_partitioned(env, model_spec, zero3, built, env.vocab_map(model_spec.vocab, built))


def _built_partitioned(env: RunEnv, model_spec: ModelSpec, zero3: dict[str, Any], built: dict[str, nn.Module],
                       vmap: Any) -> nn.Module:
    from runtime import models as M

    rows = None if vmap is None else vmap.kept_ids
    shaped = model_spec if vmap is None else _with_rows(model_spec, vmap.size)
    net = M.build_student_partitioned(shaped, zero3, trust_remote_code=env.trust_remote_code, base_dir=env.base_dir,
                                      allow_pickle=env.allow_pickle,
                                      rows=rows if model_spec.init.kind == "pretrained" else None)
    if model_spec.init.kind == "copy":
        M.copy_init(net, model_spec, built, rows=rows)
    return net


def _build_teacher(env: RunEnv, name: str, placing: Placing, copied_from: bool) -> nn.Module:
    """A teacher as the plan places it; one a student copies its init from keeps every block."""
    from runtime import models as M

    model_spec = env.plan.spec.models[name]
    keep = None if copied_from else placing.keep_blocks.get(name)
    if model_spec.source_kind == "derived" or model_spec.init.kind in ("random", "copy"):
        net = _build_one(env, model_spec, built={})  # a teacher of random weights (tests, architecture studies)
        if keep is not None:
            from runtime.adapters import adapter_for

            adapter_for(net).prune(net, keep, drop_head=True)
        return net
    build = partial(tensor_parallel.build_teacher, size=placing.tp[name]) if name in placing.tp else \
        partial(M.build_teacher, zero3=placing.zero3.get(name))
    return build(model_spec, env.base_dir, keep_blocks=keep, drop_head=keep is not None,
                 trust_remote_code=env.trust_remote_code, allow_pickle=env.allow_pickle)


def _copy_source(
    env: RunEnv, name: str, built: dict[str, nn.Module], trained: Mapping[str, Path]
) -> nn.Module:
    """The model a student copies its init from, holding the weights an earlier stage trained into it.

    Copying from a student trained in an earlier stage (e.g. a classifier initialised from a distilled LM)
    must read its trained weights, not the init it started that stage with.
    """
    spec = env.plan.spec
    model_spec = spec.models[name]
    if name in trained:
        from runtime import models as M

        net = _build_one(env, model_spec.model_copy(update={"init": InitSpec(kind="random")}), built)
        M.load_weights(net, trained[name], name)
        return net
    if model_spec.init.kind == "copy" and model_spec.init.source not in built:
        built[str(model_spec.init.source)] = _copy_source(env, str(model_spec.init.source), built, trained)
    return _build_one(env, model_spec, built)


def _build_one(env: RunEnv, model_spec: ModelSpec, built: dict[str, nn.Module]) -> nn.Module:
    from runtime import models as M

    return M.build_model(
        model_spec, env.base_dir, built, trust_remote_code=env.trust_remote_code, allow_pickle=env.allow_pickle
    )


def build_vocab_map(env: RunEnv, vocab_name: str, built: dict[str, nn.Module]) -> Any:
    """GLMD: rank the source tokenizer's ids by frequency on the ranking data, keep the top rows, remap the rest."""
    from runtime import data as D
    from runtime import models as M
    from runtime import vocab as V

    spec = env.plan.spec
    vocab = spec.vocabs[vocab_name]
    source = spec.models[vocab.source]
    tokenizer = M.load_tokenizer(source, spec.models, env.base_dir)
    ranking = spec.data[vocab.rank_data]
    texts = D.load_texts(ranking, env.base_dir)
    tokens = D.tokenize(texts, ranking, tokenizer, ranking.seq_len, causal=not source.arch.is_encoder)
    kept = V.choose_kept(vocab, tokenizer, V.token_frequencies(tokens.dataset["input_ids"], vocab.full_size))
    embeddings = None
    if vocab.remap != "unk" and vocab.source not in built and M.streams_from_files(source, env.base_dir):
        # one tensor read from the source's files (the values its loaded model holds), the model never built
        embeddings = M.input_embeddings_from_files(source, env.base_dir, trust_remote_code=env.trust_remote_code)
    elif vocab.remap != "unk":
        owner = built.get(vocab.source) or _build_one(env, source, built)
        with eng.gathered(owner.get_input_embeddings()):  # one tensor, gathered when the owner is partitioned
            embeddings = owner.get_input_embeddings().weight.detach().float().clone()
    return V.build_vocab_map(vocab, kept, embeddings, tokenizer.unk_token_id)



def _single_student(stage: StageSpec) -> str:
    if len(stage.students) != 1:
        raise RunError(f"stage '{stage.name}': trains {len(stage.students)} models; this runtime trains one per stage")
    return stage.students[0]
