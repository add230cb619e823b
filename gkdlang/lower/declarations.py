"""Declarations: use, let, models (sources, overrides, init, head, cache), data, vocab and cluster blocks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.arch import RUNNABLE_FAMILIES, OVERRIDE_KEYS, ArchError, ArchInfo, arch_from_config, derive_config
from gkdlang.diagnostics import did_you_mean
from gkdlang.parser import ParseError, parse
from gkdlang.spec import CacheSpec, ClusterSpec, DataSpec, HeadSpec, InitSpec, ModelSpec, Span, StageSpec, VocabSpec
from gkdlang.values import ItemSet, NumVal
from gkdlang.digest import STDLIB
from gkdlang.lower.adapters import check_adapters, lower_adapter
from gkdlang.lower.context import Lowerer, MethodDef, Scope, Skip
from gkdlang.lower.readers import (
    check_arity,
    read_block,
    read_bool,
    read_bytes,
    read_column,
    read_data_name,
    read_fraction,
    read_int,
    read_kwargs,
    read_layer_list,
    read_model_name,
    read_string,
    read_strings,
    read_symbol,
)

#: deepest model gkdc checks (the deepest public LMs have ~130 blocks)
MAX_LAYERS = 1024


def check_duplicates(lw: Lowerer, decls) -> None:
    seen: dict[tuple[str, str], ast.Node] = {}
    for decl in decls:
        name = getattr(decl, "name", None)
        if name is None or isinstance(decl, ast.VocabDecl):
            continue
        ns = "stage" if isinstance(decl, ast.StageDecl) else "value"
        key = (ns, name.name)
        if key in seen:
            first = seen[key].span
            lw.err("duplicate-definition", name.span, f"'{name.name}' is already defined at line {first.line}",
                   related=[(first, "first definition")])
        else:
            seen[key] = decl
    clusters = [d for d in decls if isinstance(d, ast.ClusterDecl)]
    for extra in clusters[1:]:
        lw.err("duplicate-definition", extra.span, "only one cluster block is allowed",
               related=[(clusters[0].span, "first cluster block")])


def lower_use(lw: Lowerer, decl: ast.Use) -> None:
    for path in decl.modules:
        name = ".".join(i.name for i in path)
        file = STDLIB / (name.replace(".", "/") + ".gkd")
        if not file.exists():
            known = sorted(p.stem for p in STDLIB.glob("*.gkd"))
            lw.err("unknown-library", path[0].span, f"no library '{name}' in gkdc's standard library",
                   did_you_mean(name, known) or f"available: {', '.join(known)}")
            continue
        lw.libraries[name] = load_library(lw, name, file)


def load_library(lw: Lowerer, name: str, file: Path) -> dict[str, MethodDef]:
    text = file.read_text(encoding="utf-8")
    display = f"<stdlib>/{file.name}"
    lw.sources[display] = text
    try:
        module = parse(text, display)
    except ParseError as exc:
        lw.d.items.append(exc.diagnostic)
        return {}
    lets: dict[str, Any] = {}
    methods: dict[str, MethodDef] = {}
    for decl in module.decls:
        if isinstance(decl, ast.LetDecl):
            lets[decl.name.name] = lw.guard(lw.ev, decl.value, Scope(lets))
        elif isinstance(decl, ast.MethodDecl):
            methods[decl.name.name] = MethodDef(f"{name}.{decl.name.name}", decl, lets)
    for method_name, method in methods.items():  # a library's methods can call each other by bare name
        lets.setdefault(method_name, method)
    return methods


def _let_lines(lw: Lowerer) -> dict[str, list[int]]:
    """Lines of every ``let`` of the module, by name: built once (a dict of the later lets per let was
    quadratic: 4 of the 7.5 s a 184 KB spec of 2,000 lets took to check)."""
    lines = getattr(lw, "_let_lines", None)
    if lines is None:
        lines = {}
        for d in lw.module.decls:
            if isinstance(d, ast.LetDecl):
                lines.setdefault(d.name.name, []).append(d.span.line)
        lw._let_lines = lines
    return lines


def lower_let(lw: Lowerer, decl: ast.LetDecl) -> None:
    lines = _let_lines(lw)
    for name in _names_in(decl.value):
        if name.id in lw.lets:
            continue
        later = next((n for n in lines.get(name.id, ()) if n >= decl.span.line), None) \
            if name.id != decl.name.name else None
        if later is not None or name.id == decl.name.name:
            where = later if later is not None else decl.span.line
            raise lw.err("unknown-name", name.span, f"'{name.id}' is used before its definition (line {where})"
                         if name.id != decl.name.name else f"'{name.id}' is defined in terms of itself",
                         "a `let` can use only the constants declared above it")
    lw.lets[decl.name.name] = lw.ev(decl.value, Scope(lw.lets))


def _names_in(expr: ast.Node) -> list[ast.Name]:
    """Every Name in an expression, iteratively (no recursion limit)."""
    import dataclasses

    out, stack = [], [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name):
            out.append(node)
        if isinstance(node, tuple):
            stack.extend(node)
        elif dataclasses.is_dataclass(node) and isinstance(node, ast.Node):
            stack.extend(getattr(node, f.name) for f in dataclasses.fields(node) if f.name != "span")
    return out


def models_in_dependency_order(lw: Lowerer, decls) -> list[ast.ModelDecl]:
    models = [d for d in decls if isinstance(d, ast.ModelDecl)]
    for m in models:
        lw.model_decls.setdefault(m.name.name, m)
    order: list[ast.ModelDecl] = []
    state: dict[str, int] = {}

    def visit(m: ast.ModelDecl) -> None:
        if state.get(m.name.name) == 2:
            return
        if state.get(m.name.name) == 1:
            lw.err("bad-override", m.span, f"model '{m.name.name}' is derived from itself")
            return
        state[m.name.name] = 1
        base = like_base(m)
        if base in lw.model_decls:
            visit(lw.model_decls[base])
        state[m.name.name] = 2
        order.append(m)

    for m in models:
        visit(m)
    return order


def like_base(m: ast.ModelDecl) -> str | None:
    src = m.source
    if isinstance(src, ast.Call) and isinstance(src.func, ast.Name) and src.func.id == "like" and src.args:
        arg = src.args[0]
        return arg.id if isinstance(arg, ast.Name) else None
    return None


def lower_model(lw: Lowerer, decl: ast.ModelDecl) -> None:
    name = decl.name.name
    src = decl.source
    if not (isinstance(src, ast.Call) and isinstance(src.func, ast.Name)):
        raise lw.err("type-mismatch", src.span, "a model is declared as hf(\"<hub id or dir>\") or like(<model>)")
    opts = read_block(lw, decl.options, B.MODEL_KEYS, "model")
    overrides = {k: read_int(lw, v, k, minimum=1) for k, v in opts.items() if k in OVERRIDE_KEYS}
    func = src.func.id
    if func == "hf":
        check_arity(lw, src, 1, "hf")
        source = read_string(lw, src.args[0], "hf")
        kind, config, path = resolve_model_source(lw, source, src.args[0].span)
        base, source_val = None, path if kind == "local" else source  # a cached hub model keeps its id
        if overrides:
            config = derive_config(arch_of(lw, config, src.span), overrides)
    elif func == "like":
        check_arity(lw, src, 1, "like")
        base = read_model_name(lw, src.args[0])
        if base not in lw.models:
            raise Skip()  # the base failed earlier and was reported
        config = derive_config(lw.models[base].arch, overrides)
        kind, source_val = "derived", None
    else:
        hint = did_you_mean(func, ["hf", "like"]) or "use hf(\"...\") or like(model)"
        raise lw.err("unknown-function", src.func.span, f"unknown model source '{func}'", hint)
    arch = arch_of(lw, config, decl.options.span if decl.options else src.span)
    check_arch(lw, arch, decl)
    if arch.family not in RUNNABLE_FAMILIES and func == "hf":
        lw.err("family-not-runnable", src.span, f"model '{name}' is a {arch.family} model: gkdc plans it, but "
               f"`gkdc run` cannot train or capture this family yet (runnable: {', '.join(sorted(RUNNABLE_FAMILIES))})")
    role = decl.role
    frozen = read_bool(lw, opts["frozen"], "frozen") if "frozen" in opts else role == "teacher"
    dtype = read_symbol(lw, opts["dtype"], "dtype", B.DTYPES) if "dtype" in opts else "bf16"
    init = lower_init(lw, opts.get("init"), role, base)
    head = lower_head(lw, opts.get("head"))
    if arch.family == "glm" and head.kind == "classify":  # no parameter count, no transformers class
        raise lw.err("bad-value", opts["head"].span, "GLM models have no sequence-classification head",
                     "use head: lm (cloze-style classification) or head: none")
    cache = lower_cache(lw, opts["cache"], name, role, arch) if "cache" in opts else None
    adapter = lower_adapter(lw, opts["adapter"], name, role, arch, init) if "adapter" in opts else None
    lw.models[name] = ModelSpec(name=name, role=role, source_kind=kind, source=source_val, base=base,
                                overrides=overrides, arch=arch, dtype=dtype, frozen=frozen, init=init,
                                head=head, cache=cache, adapter=adapter, span=decl.span)


def lower_cache(lw: Lowerer, expr: ast.Expr, name: str, role: str, arch: ArchInfo) -> CacheSpec:
    """``cache: topk(k: 32, tail: sampled, samples: 80, seed: 0, dtype: fp16, path: "cache/<name>")``: an
    offline teacher (see runtime/cache.py)."""
    if role != "teacher":
        raise lw.err("bad-value", expr.span, f"cache is a teacher option; '{name}' is a {role}",
                     "an assistant is trained in this spec, so a cache of it would be stale")
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "topk"):
        raise lw.err("type-mismatch", expr.span, "cache is topk(k: <count>, tail: sampled|bucket, "
                     "samples: <count>, seed: <int>, dtype: fp16|bf16|fp32, path: \"dir\")")
    check_arity(lw, expr, 0, "topk")
    kw = read_kwargs(lw, expr, {"k": "int", "tail": "symbol", "samples": "int", "seed": "int", "dtype": "symbol",
                                "path": "string"})
    k = read_int(lw, kw["k"], "k", minimum=1) if "k" in kw else 32
    if k > arch.vocab_size:
        raise lw.err("bad-value", kw["k"].span, f"k {k} is larger than the vocabulary of '{name}' "
                     f"({arch.vocab_size} tokens)")
    tail = read_symbol(lw, kw["tail"], "tail", ("sampled", "bucket")) if "tail" in kw else "sampled"
    if tail == "bucket" and "samples" in kw:
        raise lw.err("bad-value", kw["samples"].span, "samples are drawn for tail: sampled only",
                     "drop samples, or use tail: sampled")
    samples = 0 if tail == "bucket" else read_int(lw, kw["samples"], "samples", minimum=1) if "samples" in kw \
        else 80
    seed = read_int(lw, kw["seed"], "seed", minimum=0) if "seed" in kw else 0
    dtype = read_symbol(lw, kw["dtype"], "dtype", B.DTYPES) if "dtype" in kw else "fp16"
    path = read_string(lw, kw["path"], "path") if "path" in kw else f"cache/{name}"
    return CacheSpec(k=k, tail=tail, samples=samples, seed=seed, dtype=dtype, path=path)


def resolve_model_source(lw: Lowerer, source: str, span: Span) -> tuple[str, dict, str | None]:
    from gkdlang.models import SourceError, resolve_source

    try:
        resolved = resolve_source(source, lw.base_dir)
    except SourceError as exc:
        raise lw.err("model-source", span, str(exc.message if hasattr(exc, "message") else exc),
                     getattr(exc, "hint", None))
    return resolved.kind, resolved.config, resolved.path


def arch_of(lw: Lowerer, config: dict, span: Span) -> ArchInfo:
    try:
        return arch_from_config(config)
    except ArchError as exc:
        raise lw.err("bad-config", span, str(exc))


def check_arch(lw: Lowerer, arch: ArchInfo, decl: ast.ModelDecl) -> None:
    span = decl.options.span if decl.options else decl.span
    if arch.num_layers > MAX_LAYERS:  # every layered signal is expanded per layer while checking
        raise lw.err("bad-override", span, f"{arch.num_layers} layers: gkdc handles at most {MAX_LAYERS}")
    if arch.hidden_size % arch.num_heads:
        raise lw.err("bad-override", span,
                     f"hidden size {arch.hidden_size} is not divisible by {arch.num_heads} heads")
    if arch.num_heads % arch.num_kv_heads:
        raise lw.err("bad-override", span,
                     f"{arch.num_heads} heads are not divisible by {arch.num_kv_heads} key/value heads")


def lower_init(lw: Lowerer, expr: ast.Expr | None, role: str, base: str | None) -> InitSpec:
    if expr is None:
        return InitSpec(kind="pretrained") if role == "teacher" or base is None else InitSpec(kind="random")
    if isinstance(expr, ast.Name) and expr.id in ("random", "pretrained"):
        if expr.id == "pretrained" and base is not None:
            raise lw.err("bad-value", expr.span, "a model declared like(...) has no pretrained weights",
                         "use init: random or init: copy(<model>, layers: [...])")
        return InitSpec(kind=expr.id)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "copy":
        check_arity(lw, expr, 1, "copy")
        source = read_model_name(lw, expr.args[0])
        kw = read_kwargs(lw, expr, {"layers": "list"})
        layers = None
        if "layers" in kw:
            layers = read_layer_list(lw, kw["layers"], lw.models[source].arch.num_layers, expr, source)
        return InitSpec(kind="copy", source=source, layers=layers)
    raise lw.err("type-mismatch", expr.span, "init is random, pretrained or copy(<model>, layers: [...])")


def lower_head(lw: Lowerer, expr: ast.Expr | None) -> HeadSpec:
    if expr is None:
        return HeadSpec()
    if isinstance(expr, ast.Name) and expr.id in ("lm", "none"):
        return HeadSpec(kind=expr.id)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "classify":
        check_arity(lw, expr, 1, "classify")
        return HeadSpec(kind="classify", num_labels=read_int(lw, expr.args[0], "classify", minimum=2))
    raise lw.err("type-mismatch", expr.span, "head is lm, none or classify(<number of labels>)")


def lower_data(lw: Lowerer, decl: ast.DataDecl) -> None:
    src = decl.source
    if not (isinstance(src, ast.Call) and isinstance(src.func, ast.Name)):
        raise lw.err("type-mismatch", src.span, 'a data source is declared as text("glob"), jsonl("..."), ...')
    fmt = src.func.id
    if fmt not in B.DATA_FORMATS:
        raise lw.err("unknown-function", src.func.span, f"unknown data format '{fmt}'",
                     did_you_mean(fmt, B.DATA_FORMATS) or f"formats: {', '.join(B.DATA_FORMATS)}")
    if not src.args:
        raise lw.err("bad-arity", src.span, f"{fmt}() needs at least one path or glob")
    paths = [read_string(lw, a, fmt) for a in src.args]
    opts = read_block(lw, decl.options, B.CHAT_DATA_KEYS if fmt == "chat" else B.DATA_KEYS, "data")
    fields: dict[str, Any] = {}
    for key in ("text", "pair", "label", "messages"):
        if key in opts:
            fields[key] = read_column(lw, opts[key], key)
    if "assistant_only" in opts:
        fields["assistant_only"] = read_bool(lw, opts["assistant_only"], "assistant_only")
    if "seq_len" in opts:
        fields["seq_len"] = read_int(lw, opts["seq_len"], "seq_len", minimum=1)
    if "split" in opts:
        fields["split"] = read_fraction(lw, opts["split"], "split")
        if not 0 < fields["split"] < 1:
            lw.err("bad-value", opts["split"].span, "split holds out a fraction between 0% and 100% (exclusive)",
                   "e.g. split: 5%")
            del fields["split"]
    if "packing" in opts:
        fields["packing"] = read_bool(lw, opts["packing"], "packing")
    for pattern in paths:
        full = Path(pattern) if Path(pattern).is_absolute() else lw.base_dir / pattern
        if not any(full.parent.glob(full.name)) if full.parent.exists() else True:
            lw.err("data-not-found", src.span, f"'{pattern}' matches no file (relative to {lw.base_dir})")
        elif fmt == "chat":
            check_chat_rows(lw, src.span, full, fields.get("messages", "messages"))
    lw.data[decl.name.name] = DataSpec(name=decl.name.name, format=fmt, paths=paths, span=decl.span, **fields)


def check_chat_rows(lw: Lowerer, span, pattern: Path, column: str) -> None:
    """Chat files hold conversations (gkdlang.chat.row_problem; the first rows of files up to a size)."""
    from gkdlang import chat

    for path in sorted(p for p in pattern.parent.glob(pattern.name) if p.is_file()):
        for line, problem in chat.file_problems(path, column):
            lw.err("bad-chat-data", span, f"{path.name} line {line} {problem}",
                   'each line is {"messages": [{"role": "user", "content": "..."}, '
                   '{"role": "assistant", "content": "..."}]}')


def check_chat_templates(lw: Lowerer, stages: list[StageSpec]) -> None:
    """A stage reading chat data has causal students whose local tokenizer folder holds a chat template."""
    for stage in stages:
        for name in dict.fromkeys([stage.data, *([stage.generate.prompts] if stage.generate else [])]):
            check_chat_template(lw, stage, lw.data.get(name))


def check_chat_template(lw: Lowerer, stage: StageSpec, data) -> None:
    """One chat data source a stage reads (its data, or its prompts)."""
    from gkdlang import chat

    if data is None or data.format != "chat":
        return
    for name in [*stage.students, *stage.teachers]:
        model = lw.models[name]
        if model.arch.is_encoder:
            lw.err("type-mismatch", model.span, f"stage '{stage.name}' reads chat data '{data.name}', whose loss "
                   f"is next-token prediction on assistant turns, but '{name}' is a masked LM")
    if not stage.students:
        return
    owner = lw.models[stage.students[0]]
    while owner.source_kind == "derived" and owner.base in lw.models:
        owner = lw.models[owner.base]
    if owner.source_kind != "local" or not owner.source:
        return  # a catalog or hub tokenizer is read at run time (runtime.chat.template_of)
    folder = Path(owner.source) if Path(owner.source).is_absolute() else lw.base_dir / owner.source
    if folder.is_dir() and chat.template_in(folder) is None:
        lw.err("no-chat-template", lw.data_decls[data.name].span,
               f"data '{data.name}' is chat data, but the tokenizer of '{owner.name}' ({folder}) has no chat "
               f"template to render it with (stage '{stage.name}')",
               "add chat_template.jinja to the folder, or declare the data as jsonl(...) { text: ... }")


def lower_vocab(lw: Lowerer, decl: ast.VocabDecl) -> None:
    name, source = decl.name.name, decl.base.name
    if source not in lw.models:
        raise lw.unknown("unknown-model", decl.base.span, source, lw.models)
    if name not in lw.models:
        raise lw.unknown("unknown-model", decl.name.span, name, lw.models)
    student = lw.models[name]
    if student.role == "teacher":
        raise lw.err("vocab-target", decl.name.span, f"vocabulary compression applies to a student; '{name}' "
                     "is a teacher")
    opts = read_block(lw, decl.options, B.VOCAB_KEYS, "vocab")
    full = lw.models[source].arch.vocab_size
    multiple = read_int(lw, opts["multiple"], "multiple", minimum=1) if "multiple" in opts else 128
    if "keep" not in opts:
        raise lw.err("missing-option", decl.options.span, "vocab block needs 'keep' (a percentage or a row count)")
    keep = lw.ev(opts["keep"], Scope(lw.lets))
    if not isinstance(keep, NumVal) or keep.unit == "bytes":
        raise lw.err("type-mismatch", opts["keep"].span, "keep is a percentage (50%) or a row count")
    fraction = keep.value if keep.unit == "percent" else None
    raw_rows = keep.value * full if fraction is not None else keep.value
    if raw_rows <= 0 or keep.value < 0:
        raise lw.err("bad-value", opts["keep"].span, f"keep must keep at least one row, got "
                     f"{'0%' if fraction is not None and raw_rows <= 0 else int(raw_rows)}")
    if raw_rows > full:
        raise lw.err("vocab-too-large", opts["keep"].span,
                     f"keep of {int(raw_rows)} rows is outside 1..{full}, the vocabulary of '{source}'")
    rows = min(full, int(math.ceil(raw_rows / multiple)) * multiple)
    if "rank" not in opts:
        raise lw.err("missing-option", decl.options.span, "vocab block needs 'rank: frequency(<data>)'")
    rank = opts["rank"]
    if not (isinstance(rank, ast.Call) and isinstance(rank.func, ast.Name) and rank.func.id == "frequency"
            and len(rank.args) == 1):
        raise lw.err("type-mismatch", rank.span, "rank is frequency(<data source>)")
    rank_data = read_data_name(lw, rank.args[0])
    protect = read_strings(lw, opts["protect"], "protect") if "protect" in opts else []
    remap = lower_remap(lw, opts.get("remap"), source)
    if source == name and remap != "unk" and student.init.kind == "random":
        # the remap compares the source's embedding rows; a random student's carry no meaning (and a derived one
        # is built at the kept rows, so there are no dropped rows to compare)
        raise lw.err("vocab-remap-random", (opts.get("remap") or decl.base).span,
                     f"vocab '{name}' ranks its own rows and remaps dropped tokens by the embeddings of '{name}', "
                     "which starts from random weights: the nearest kept row would be chosen by noise",
                     "rank from a pretrained model (vocab s from <teacher> { ... }), give the student a pretrained or "
                     "copied init, or use remap: unk")
    lw.vocabs[name] = VocabSpec(name=name, source=source, full_size=full, keep_fraction=fraction,
                                keep_rows=rows, multiple=multiple, rank_data=rank_data, protect=protect,
                                remap=remap, span=decl.span)
    # the student's Spec describes the model as trained: embedding and head sized to the kept rows
    arch = student.arch
    config = dict(arch.config, **{OVERRIDE_KEYS["vocab"]["*"]: rows})
    lw.models[name] = student.model_copy(update={"vocab": name, "arch": arch.model_copy(
        update={"vocab_size": rows, "config": config})})


def lower_remap(lw: Lowerer, expr: ast.Expr | None, source: str) -> str:
    if expr is None:
        return "nearest"
    if isinstance(expr, ast.Name) and expr.id == "unk":
        return "unk"
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in (
            "nearest", "cosine", "euclidean"):
        if expr.args:
            value = lw.ev(expr.args[0], Scope(lw.lets))
            if not (isinstance(value, ItemSet) and value.items[0].node.kind == "embeddings"):
                raise lw.err("type-mismatch", expr.args[0].span, "remap compares teacher embeddings: "
                             f"{expr.func.id}({source}.embeddings)")
        return expr.func.id
    raise lw.err("type-mismatch", expr.span, "remap is nearest(<model>.embeddings), cosine(...), "
                 "euclidean(...) or unk")


def lower_cluster(lw: Lowerer, decl: ast.ClusterDecl | None) -> ClusterSpec | None:
    if decl is None:
        span = Span(file=lw.file, line=1, col=1, end_line=1, end_col=1)
        return ClusterSpec(gpu="cpu", span=span)
    try:
        opts = read_block(lw, decl.options, B.CLUSTER_KEYS, "cluster")
        fields: dict[str, Any] = {}
        if "gpus" in opts:
            value = opts["gpus"]
            if isinstance(value, ast.HwSpec):
                if value.count < 1:
                    raise lw.err("bad-value", value.span, f"gpus must be at least 1, got {value.count}")
                fields["gpus_per_node"], fields["gpu"] = value.count, value.device
            else:
                fields["gpus_per_node"] = read_int(lw, value, "gpus", minimum=1)
        if "gpu" in opts:
            fields["gpu"] = read_string(lw, opts["gpu"], "gpu")
        if "nodes" in opts:
            fields["nodes"] = read_int(lw, opts["nodes"], "nodes", minimum=1)
            gpus = opts.get("gpus")
            if fields["nodes"] > 1 and isinstance(gpus, ast.HwSpec) and not gpus.per_node:
                count = gpus.count
                lw.err("gpus-per-node", gpus.span, f"gpus counts the devices of one node: {fields['nodes']} nodes x "
                        f"{count} = {fields['nodes'] * count} ranks",
                        f"say so: gpus: {count} x {fields.get('gpu', 'A100-40GB')} per node")
        for key in ("cpu_memory", "nvme", "gpu_memory"):
            if key in opts:
                fields[key] = read_bytes(lw, opts[key], key)
        if "precision" in opts:
            fields["precision"] = read_symbol(lw, opts["precision"], "precision", B.DTYPES)
        if "gpu" not in fields and "gpus" in opts:
            raise lw.err("missing-option", decl.options.span,
                         "say which device: gpus: 8 x A100-40GB (or gpu: \"A100-40GB\")")
        return ClusterSpec(span=decl.span, **fields)
    except Skip:
        return None


def _weights_folder(lw: Lowerer, model: ModelSpec) -> Path | None:
    """The folder of a local model, or the cached snapshot of a hub model (gkdlang.models.hub_snapshot)."""
    if model.source_kind == "hub":
        from gkdlang.models import hub_snapshot

        return hub_snapshot(str(model.source))
    folder = Path(model.source)
    return folder if folder.is_absolute() else lw.base_dir / folder


def check_teacher_weights(lw: Lowerer, stages: list[StageSpec]) -> None:
    """A local teacher folder holds the heads the spec reads (gkdlang.weights: safetensors headers, no torch)."""
    from gkdlang import weights as W

    for name, kinds in W.read_kinds(stages).items():
        model = lw.models.get(name)
        if model is None or model.role != "teacher" or model.source_kind not in ("local", "hub") \
                or model.init.kind != "pretrained":
            continue
        folder = _weights_folder(lw, model)
        if folder is None:
            continue
        try:
            names = W.folder_names(folder)
        except (W.HeaderError, OSError) as exc:
            lw.err("missing-weights", model.span, f"teacher '{name}': cannot read the weights in {folder}: {exc}")
            continue
        if names is None:
            continue
        lacks = W.missing_head(model, names)
        if lacks is not None:
            reads = sorted(kinds & {"logits", "task_logits"})
            lw.err("missing-weights", model.span,
                   f"teacher '{name}' has head: {model.head.kind}" + (f" and is read for {', '.join(reads)}"
                                                                       if reads else "") +
                   f", but {folder} has no {lacks}: it would be initialised randomly",
                   "point hf(...) at a folder saved with its head (e.g. BertForMaskedLM)" +
                   ("" if reads else ", or declare head: none (only hidden states and attention are read)"))


def final_checks(lw: Lowerer, decls, stages: list[StageSpec]) -> None:
    check_teacher_weights(lw, stages)
    check_chat_templates(lw, stages)
    check_adapters(lw)
    if not any(isinstance(d, ast.ModelDecl) and d.role in ("student", "assistant") for d in decls):
        lw.err("no-student", lw.module.span,
               "the spec declares no student (student <name> = like(<teacher>) { ... })")
    stage_decls = [d for d in decls if isinstance(d, ast.StageDecl)]
    if not stage_decls:
        lw.err("no-stages", lw.module.span, "the spec declares no stage")
    for name, decl in lw.model_decls.items():
        if name not in lw.used and name in lw.models and lw.models[name].role == "teacher":
            lw.err("unused-definition", decl.name.span, f"teacher '{name}' is never used")
    for name, decl in lw.data_decls.items():
        if name not in lw.used:
            lw.err("unused-definition", decl.name.span, f"data '{name}' is never used")
