"""AST -> Spec: name resolution, method inlining, layer maps and shape checks, all diagnostics in one pass.

The interpreter evaluates expressions to the values of ``gkdlang.values``; a construct that fails reports a
diagnostic and raises ``_Skip`` so that only that construct is dropped and checking goes on with the rest.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pydantic

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.arch import OVERRIDE_KEYS, ArchError, ArchInfo, arch_from_config, derive_config
from gkdlang.diagnostics import Collector, Diagnostic, did_you_mean
from gkdlang.parser import ParseError, parse
from gkdlang.spec import (
    CacheSpec,
    ClusterSpec,
    DataSpec,
    Gate,
    HeadSpec,
    InitSpec,
    Intervention,
    LossTerm,
    LRScheduleSpec,
    ModelSpec,
    OpNode,
    OptimizerSpec,
    Schedule,
    SignalNode,
    Span,
    Spec,
    StageSpec,
    VocabSpec,
)
from gkdlang.values import (
    CallVal,
    DataRef,
    Feat,
    Item,
    ItemSet,
    LayerMap,
    ModelRef,
    NumVal,
    Objective,
    PerModel,
    Symbol,
    Term,
    Trigger,
    WeightError,
    mul_schedules,
)

STDLIB = Path(__file__).with_name("stdlib")
#: deepest model gkdc checks (the deepest public LMs have ~130 blocks)
MAX_LAYERS = 1024


class _Skip(Exception):
    """A diagnostic was reported; abandon the construct being lowered."""


@dataclass
class CheckResult:
    spec: Spec | None
    diagnostics: list[Diagnostic]
    sources: dict[str, str]
    module: ast.Module | None = None

    @property
    def ok(self) -> bool:
        return self.spec is not None and not any(d.severity == "error" for d in self.diagnostics)


def check_file(path: str | Path, *, display_name: str | None = None) -> CheckResult:
    path = Path(path)
    name = display_name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        span = Span(file=name, line=1, col=1, end_line=1, end_col=1)
        d = Diagnostic("syntax-unexpected-char", f"file is not UTF-8 (byte {exc.start})", span)
        return CheckResult(None, [d], {})
    return check_source(text, name, base_dir=path.parent)


def check_source(text: str, file: str = "<input>", *, base_dir: str | Path | None = None) -> CheckResult:
    """Parse and lower a spec text; never raises for bad input."""
    sources = {file: text}
    try:
        module = parse(text, file)
    except ParseError as exc:
        return CheckResult(None, [exc.diagnostic], sources)
    diags = Collector()
    spec = _Lowerer(module, text, file, Path(base_dir or "."), diags, sources).run()
    return CheckResult(spec if not diags.has_errors() else None, diags.sorted(), sources, module)


def spec_hash(text: str, uses: list[str]) -> str:
    """sha256 of the spec text and of every ``use``d library (a library edit changes the plan too).

    ``gkdc run`` recomputes it to refuse a plan whose spec changed since planning.
    """
    h = hashlib.sha256(text.encode())
    for name in sorted(uses):
        h.update(b"\0" + name.encode() + b"\0")
        library = STDLIB / (name.replace(".", "/") + ".gkd")
        h.update(library.read_bytes() if library.exists() else b"")  # a deleted library reads as "changed"
    return h.hexdigest()


# ---------------------------------------------------------------- numbers

_COUNT_UNITS = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_BYTE_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def number_value(text: str) -> NumVal:
    for suffix, factor in sorted(_BYTE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return NumVal(float(text[: -len(suffix)]) * factor, "bytes")
    if text.endswith("%"):
        return NumVal(float(text[:-1]) / 100.0, "percent")
    if text[-1] in _COUNT_UNITS:
        return NumVal(float(text[:-1]) * _COUNT_UNITS[text[-1]], None)
    return NumVal(float(text), None)


# ---------------------------------------------------------------- methods and scopes


@dataclass(frozen=True)
class MethodDef:
    qualname: str
    decl: ast.MethodDecl
    lets: dict[str, Any]


@dataclass(frozen=True)
class Scope:
    values: dict[str, Any]
    stack: tuple[str, ...] = ()
    method: str | None = None


_VECTOR_KINDS = frozenset({"hidden", "qkv", "ffn"})
_SIGNAL_FEAT_KIND = {
    "embeddings": "hidden", "hidden": "hidden", "attn_scores": "attn", "attn_probs": "attn", "query": "qkv",
    "key": "qkv", "value": "qkv", "ffn": "qkv", "logits": "logits", "task_logits": "task_logits",
}


class _Lowerer:
    def __init__(self, module: ast.Module, text: str, file: str, base_dir: Path, diags: Collector,
                 sources: dict[str, str]):
        self.module, self.text, self.file, self.base_dir = module, text, file, base_dir
        self.d, self.sources = diags, sources
        self.models: dict[str, ModelSpec] = {}
        self.model_decls: dict[str, ast.ModelDecl] = {}
        self.data: dict[str, DataSpec] = {}
        self.data_decls: dict[str, ast.DataDecl] = {}
        self.vocabs: dict[str, VocabSpec] = {}
        self.lets: dict[str, Any] = {}
        self.methods: dict[str, MethodDef] = {}
        self.libraries: dict[str, dict[str, MethodDef]] = {}
        self.used: set[str] = set()
        self._module_ids = 0
        self._group_ids = 0
        self.cluster: ClusterSpec | None = None

    def err(self, code: str, span: Span | None, msg: str, hint: str | None = None, related=()) -> _Skip:
        self.d.report(code, span, msg, hint, related)
        return _Skip()

    # ------------------------------------------------------------ driver

    def run(self) -> Spec | None:
        decls = self.module.decls
        self._check_duplicates(decls)
        for decl in decls:
            if isinstance(decl, ast.Use):
                self._guard(self._use, decl)
        for decl in decls:
            if isinstance(decl, ast.LetDecl):
                self._guard(self._let, decl)
            elif isinstance(decl, ast.MethodDecl):
                self.methods.setdefault(decl.name.name, MethodDef(decl.name.name, decl, self.lets))
        for decl in self._models_in_dependency_order(decls):
            self._guard(self._model, decl)
        for decl in decls:
            if isinstance(decl, ast.DataDecl):
                # recorded before lowering so a data source that fails is not also reported as unknown
                self.data_decls.setdefault(decl.name.name, decl)
                self._guard(self._data, decl)
        for decl in decls:
            if isinstance(decl, ast.VocabDecl):
                self._guard(self._vocab, decl)
        cluster = self.cluster = self._cluster(next((d for d in decls if isinstance(d, ast.ClusterDecl)), None))
        stages = self._stages([d for d in decls if isinstance(d, ast.StageDecl)])
        self._final_checks(decls, stages)
        if self.d.has_errors() or cluster is None:
            return None
        try:
            return Spec(file=self.file, source_hash=self._source_hash(),
                        models=self.models, data=self.data, vocabs=self.vocabs, stages=stages, cluster=cluster,
                        uses=sorted(self.libraries))
        except pydantic.ValidationError as exc:  # a gap between checks and the model: report, never crash
            self.err("bad-value", None, f"internal consistency check failed: {exc.errors()[0]['msg']}")
            return None

    def _source_hash(self) -> str:
        return spec_hash(self.text, sorted(self.libraries))

    def _guard(self, fn: Callable, *args) -> Any:
        try:
            return fn(*args)
        except _Skip:
            return None

    def _check_duplicates(self, decls) -> None:
        seen: dict[tuple[str, str], ast.Node] = {}
        for decl in decls:
            name = getattr(decl, "name", None)
            if name is None or isinstance(decl, ast.VocabDecl):
                continue
            ns = "stage" if isinstance(decl, ast.StageDecl) else "value"
            key = (ns, name.name)
            if key in seen:
                first = seen[key].span
                self.err("duplicate-definition", name.span, f"'{name.name}' is already defined at line {first.line}",
                         related=[(first, "first definition")])
            else:
                seen[key] = decl
        clusters = [d for d in decls if isinstance(d, ast.ClusterDecl)]
        for extra in clusters[1:]:
            self.err("duplicate-definition", extra.span, "only one cluster block is allowed",
                     related=[(clusters[0].span, "first cluster block")])

    # ------------------------------------------------------------ use / let / methods

    def _use(self, decl: ast.Use) -> None:
        for path in decl.modules:
            name = ".".join(i.name for i in path)
            file = STDLIB / (name.replace(".", "/") + ".gkd")
            if not file.exists():
                known = sorted(p.stem for p in STDLIB.glob("*.gkd"))
                self.err("unknown-library", path[0].span, f"no library '{name}' in gkdc's standard library",
                         did_you_mean(name, known) or f"available: {', '.join(known)}")
                continue
            self.libraries[name] = self._load_library(name, file)

    def _load_library(self, name: str, file: Path) -> dict[str, MethodDef]:
        text = file.read_text(encoding="utf-8")
        display = f"<stdlib>/{file.name}"
        self.sources[display] = text
        try:
            module = parse(text, display)
        except ParseError as exc:
            self.d.items.append(exc.diagnostic)
            return {}
        lets: dict[str, Any] = {}
        methods: dict[str, MethodDef] = {}
        for decl in module.decls:
            if isinstance(decl, ast.LetDecl):
                lets[decl.name.name] = self._guard(self.ev, decl.value, Scope(lets))
            elif isinstance(decl, ast.MethodDecl):
                methods[decl.name.name] = MethodDef(f"{name}.{decl.name.name}", decl, lets)
        for method_name, method in methods.items():  # a library's methods can call each other by bare name
            lets.setdefault(method_name, method)
        return methods

    def _let(self, decl: ast.LetDecl) -> None:
        self.lets[decl.name.name] = self.ev(decl.value, Scope(self.lets))

    # ------------------------------------------------------------ models

    def _models_in_dependency_order(self, decls) -> list[ast.ModelDecl]:
        models = [d for d in decls if isinstance(d, ast.ModelDecl)]
        for m in models:
            self.model_decls.setdefault(m.name.name, m)
        order: list[ast.ModelDecl] = []
        state: dict[str, int] = {}

        def visit(m: ast.ModelDecl) -> None:
            if state.get(m.name.name) == 2:
                return
            if state.get(m.name.name) == 1:
                self.err("bad-override", m.span, f"model '{m.name.name}' is derived from itself")
                return
            state[m.name.name] = 1
            base = self._like_base(m)
            if base in self.model_decls:
                visit(self.model_decls[base])
            state[m.name.name] = 2
            order.append(m)

        for m in models:
            visit(m)
        return order

    @staticmethod
    def _like_base(m: ast.ModelDecl) -> str | None:
        src = m.source
        if isinstance(src, ast.Call) and isinstance(src.func, ast.Name) and src.func.id == "like" and src.args:
            arg = src.args[0]
            return arg.id if isinstance(arg, ast.Name) else None
        return None

    def _model(self, decl: ast.ModelDecl) -> None:
        name = decl.name.name
        src = decl.source
        if not (isinstance(src, ast.Call) and isinstance(src.func, ast.Name)):
            raise self.err("type-mismatch", src.span, "a model is declared as hf(\"<hub id or dir>\") or like(<model>)")
        opts = self._block(decl.options, B.MODEL_KEYS, "model")
        overrides = {k: self._int(v, k, minimum=1) for k, v in opts.items() if k in OVERRIDE_KEYS}
        func = src.func.id
        if func == "hf":
            self._arity(src, 1, "hf")
            source = self._string(src.args[0], "hf")
            kind, config, path = self._resolve_source(source, src.args[0].span)
            base, source_val = None, path or source
            if overrides:
                config = derive_config(self._arch(config, src.span), overrides)
        elif func == "like":
            self._arity(src, 1, "like")
            base = self._model_name(src.args[0])
            if base not in self.models:
                raise _Skip()  # the base failed earlier and was reported
            config = derive_config(self.models[base].arch, overrides)
            kind, source_val = "derived", None
        else:
            hint = did_you_mean(func, ["hf", "like"]) or "use hf(\"...\") or like(model)"
            raise self.err("unknown-function", src.func.span, f"unknown model source '{func}'", hint)
        arch = self._arch(config, decl.options.span if decl.options else src.span)
        self._check_arch(arch, decl)
        role = decl.role
        frozen = self._bool(opts["frozen"], "frozen") if "frozen" in opts else role == "teacher"
        dtype = self._symbol(opts["dtype"], "dtype", B.DTYPES) if "dtype" in opts else "bf16"
        init = self._init(opts.get("init"), role, base)
        head = self._head(opts.get("head"))
        cache = self._cache(opts["cache"], name, role, arch) if "cache" in opts else None
        self.models[name] = ModelSpec(name=name, role=role, source_kind=kind, source=source_val, base=base,
                                      overrides=overrides, arch=arch, dtype=dtype, frozen=frozen, init=init,
                                      head=head, cache=cache, span=decl.span)

    def _cache(self, expr: ast.Expr, name: str, role: str, arch: ArchInfo) -> CacheSpec:
        """``cache: topk(k: 32, tail: sampled, samples: 80, seed: 0, dtype: fp16, path: "cache/<name>")``: an
        offline teacher (see runtime/cache.py)."""
        if role != "teacher":
            raise self.err("bad-value", expr.span, f"cache is a teacher option; '{name}' is a {role}",
                           "an assistant is trained in this spec, so a cache of it would be stale")
        if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "topk"):
            raise self.err("type-mismatch", expr.span, "cache is topk(k: <count>, tail: sampled|bucket, "
                           "samples: <count>, seed: <int>, dtype: fp16|bf16|fp32, path: \"dir\")")
        self._arity(expr, 0, "topk")
        kw = self._kwargs(expr, {"k": "int", "tail": "symbol", "samples": "int", "seed": "int", "dtype": "symbol",
                                 "path": "string"})
        k = self._int(kw["k"], "k", minimum=1) if "k" in kw else 32
        if k > arch.vocab_size:
            raise self.err("bad-value", kw["k"].span, f"k {k} is larger than the vocabulary of '{name}' "
                           f"({arch.vocab_size} tokens)")
        tail = self._symbol(kw["tail"], "tail", ("sampled", "bucket")) if "tail" in kw else "sampled"
        if tail == "bucket" and "samples" in kw:
            raise self.err("bad-value", kw["samples"].span, "samples are drawn for tail: sampled only",
                           "drop samples, or use tail: sampled")
        samples = 0 if tail == "bucket" else self._int(kw["samples"], "samples", minimum=1) if "samples" in kw \
            else 80
        seed = self._int(kw["seed"], "seed", minimum=0) if "seed" in kw else 0
        dtype = self._symbol(kw["dtype"], "dtype", B.DTYPES) if "dtype" in kw else "fp16"
        path = self._string(kw["path"], "path") if "path" in kw else f"cache/{name}"
        return CacheSpec(k=k, tail=tail, samples=samples, seed=seed, dtype=dtype, path=path)

    def _resolve_source(self, source: str, span: Span) -> tuple[str, dict, str | None]:
        from gkdlang.models import SourceError, resolve_source

        try:
            resolved = resolve_source(source, self.base_dir)
        except SourceError as exc:
            raise self.err("model-source", span, str(exc.message if hasattr(exc, "message") else exc),
                           getattr(exc, "hint", None))
        return resolved.kind, resolved.config, resolved.path

    def _arch(self, config: dict, span: Span) -> ArchInfo:
        try:
            return arch_from_config(config)
        except ArchError as exc:
            raise self.err("bad-config", span, str(exc))

    def _check_arch(self, arch: ArchInfo, decl: ast.ModelDecl) -> None:
        span = decl.options.span if decl.options else decl.span
        if arch.num_layers > MAX_LAYERS:  # every layered signal is expanded per layer while checking
            raise self.err("bad-override", span, f"{arch.num_layers} layers: gkdc handles at most {MAX_LAYERS}")
        if arch.hidden_size % arch.num_heads:
            raise self.err("bad-override", span,
                           f"hidden size {arch.hidden_size} is not divisible by {arch.num_heads} heads")
        if arch.num_heads % arch.num_kv_heads:
            raise self.err("bad-override", span,
                           f"{arch.num_heads} heads are not divisible by {arch.num_kv_heads} key/value heads")

    def _init(self, expr: ast.Expr | None, role: str, base: str | None) -> InitSpec:
        if expr is None:
            return InitSpec(kind="pretrained") if role == "teacher" or base is None else InitSpec(kind="random")
        if isinstance(expr, ast.Name) and expr.id in ("random", "pretrained"):
            if expr.id == "pretrained" and base is not None:
                raise self.err("bad-value", expr.span, "a model declared like(...) has no pretrained weights",
                               "use init: random or init: copy(<model>, layers: [...])")
            return InitSpec(kind=expr.id)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "copy":
            self._arity(expr, 1, "copy")
            source = self._model_name(expr.args[0])
            kw = self._kwargs(expr, {"layers": "list"})
            layers = None
            if "layers" in kw:
                layers = self._layer_list(kw["layers"], self.models[source].arch.num_layers, expr)
            return InitSpec(kind="copy", source=source, layers=layers)
        raise self.err("type-mismatch", expr.span, "init is random, pretrained or copy(<model>, layers: [...])")

    def _head(self, expr: ast.Expr | None) -> HeadSpec:
        if expr is None:
            return HeadSpec()
        if isinstance(expr, ast.Name) and expr.id in ("lm", "none"):
            return HeadSpec(kind=expr.id)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "classify":
            self._arity(expr, 1, "classify")
            return HeadSpec(kind="classify", num_labels=self._int(expr.args[0], "classify", minimum=2))
        raise self.err("type-mismatch", expr.span, "head is lm, none or classify(<number of labels>)")

    # ------------------------------------------------------------ data / vocab / cluster

    def _data(self, decl: ast.DataDecl) -> None:
        src = decl.source
        if not (isinstance(src, ast.Call) and isinstance(src.func, ast.Name)):
            raise self.err("type-mismatch", src.span, 'a data source is declared as text("glob"), jsonl("..."), ...')
        fmt = src.func.id
        if fmt not in B.DATA_FORMATS:
            raise self.err("unknown-function", src.func.span, f"unknown data format '{fmt}'",
                           did_you_mean(fmt, B.DATA_FORMATS) or f"formats: {', '.join(B.DATA_FORMATS)}")
        if not src.args:
            raise self.err("bad-arity", src.span, f"{fmt}() needs at least one path or glob")
        paths = [self._string(a, fmt) for a in src.args]
        opts = self._block(decl.options, B.DATA_KEYS, "data")
        fields: dict[str, Any] = {}
        for key in ("text", "pair", "label"):
            if key in opts:
                fields[key] = self._column(opts[key], key)
        if "seq_len" in opts:
            fields["seq_len"] = self._int(opts["seq_len"], "seq_len", minimum=1)
        if "split" in opts:
            fields["split"] = self._fraction(opts["split"], "split")
        for pattern in paths:
            full = Path(pattern) if Path(pattern).is_absolute() else self.base_dir / pattern
            if not any(full.parent.glob(full.name)) if full.parent.exists() else True:
                self.err("data-not-found", src.span, f"'{pattern}' matches no file (relative to {self.base_dir})")
        self.data[decl.name.name] = DataSpec(name=decl.name.name, format=fmt, paths=paths, span=decl.span, **fields)

    def _vocab(self, decl: ast.VocabDecl) -> None:
        name, source = decl.name.name, decl.base.name
        if source not in self.models:
            raise self._unknown("unknown-model", decl.base.span, source, self.models)
        if name not in self.models:
            raise self._unknown("unknown-model", decl.name.span, name, self.models)
        student = self.models[name]
        if student.role == "teacher":
            raise self.err("vocab-target", decl.name.span, f"vocabulary compression applies to a student; '{name}' "
                           "is a teacher")
        opts = self._block(decl.options, B.VOCAB_KEYS, "vocab")
        full = self.models[source].arch.vocab_size
        multiple = self._int(opts["multiple"], "multiple", minimum=1) if "multiple" in opts else 128
        if "keep" not in opts:
            raise self.err("missing-option", decl.options.span, "vocab block needs 'keep' (a percentage or a row count)")
        keep = self.ev(opts["keep"], Scope(self.lets))
        if not isinstance(keep, NumVal) or keep.unit == "bytes":
            raise self.err("type-mismatch", opts["keep"].span, "keep is a percentage (50%) or a row count")
        fraction = keep.value if keep.unit == "percent" else None
        raw_rows = keep.value * full if fraction is not None else keep.value
        if raw_rows > full or raw_rows <= 0:
            raise self.err("vocab-too-large", opts["keep"].span,
                           f"keep of {int(raw_rows)} rows is outside 1..{full}, the vocabulary of '{source}'")
        rows = min(full, int(math.ceil(raw_rows / multiple)) * multiple)
        if "rank" not in opts:
            raise self.err("missing-option", decl.options.span, "vocab block needs 'rank: frequency(<data>)'")
        rank = opts["rank"]
        if not (isinstance(rank, ast.Call) and isinstance(rank.func, ast.Name) and rank.func.id == "frequency"
                and len(rank.args) == 1):
            raise self.err("type-mismatch", rank.span, "rank is frequency(<data source>)")
        rank_data = self._data_name(rank.args[0])
        protect = self._strings(opts["protect"], "protect") if "protect" in opts else []
        remap = self._remap(opts.get("remap"), source)
        self.vocabs[name] = VocabSpec(name=name, source=source, full_size=full, keep_fraction=fraction,
                                      keep_rows=rows, multiple=multiple, rank_data=rank_data, protect=protect,
                                      remap=remap, span=decl.span)
        # the student's Spec describes the model as trained: embedding and head sized to the kept rows
        arch = student.arch
        config = dict(arch.config, **{OVERRIDE_KEYS["vocab"]["*"]: rows})
        self.models[name] = student.model_copy(update={"vocab": name, "arch": arch.model_copy(
            update={"vocab_size": rows, "config": config})})

    def _remap(self, expr: ast.Expr | None, source: str) -> str:
        if expr is None:
            return "nearest"
        if isinstance(expr, ast.Name) and expr.id == "unk":
            return "unk"
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in (
                "nearest", "cosine", "euclidean"):
            if expr.args:
                value = self.ev(expr.args[0], Scope(self.lets))
                if not (isinstance(value, ItemSet) and value.items[0].node.kind == "embeddings"):
                    raise self.err("type-mismatch", expr.args[0].span, "remap compares teacher embeddings: "
                                   f"{expr.func.id}({source}.embeddings)")
            return expr.func.id
        raise self.err("type-mismatch", expr.span, "remap is nearest(<model>.embeddings), cosine(...), "
                       "euclidean(...) or unk")

    def _cluster(self, decl: ast.ClusterDecl | None) -> ClusterSpec | None:
        if decl is None:
            span = Span(file=self.file, line=1, col=1, end_line=1, end_col=1)
            return ClusterSpec(gpu="cpu", span=span)
        try:
            opts = self._block(decl.options, B.CLUSTER_KEYS, "cluster")
            fields: dict[str, Any] = {}
            if "gpus" in opts:
                value = opts["gpus"]
                if isinstance(value, ast.HwSpec):
                    fields["gpus_per_node"], fields["gpu"] = value.count, value.device
                else:
                    fields["gpus_per_node"] = self._int(value, "gpus", minimum=1)
            if "gpu" in opts:
                fields["gpu"] = self._string(opts["gpu"], "gpu")
            if "nodes" in opts:
                fields["nodes"] = self._int(opts["nodes"], "nodes", minimum=1)
            for key in ("cpu_memory", "nvme", "gpu_memory"):
                if key in opts:
                    fields[key] = self._bytes(opts[key], key)
            if "precision" in opts:
                fields["precision"] = self._symbol(opts["precision"], "precision", B.DTYPES)
            if "gpu" not in fields and "gpus" in opts:
                raise self.err("missing-option", decl.options.span,
                               "say which device: gpus: 8 x A100-40GB (or gpu: \"A100-40GB\")")
            return ClusterSpec(span=decl.span, **fields)
        except _Skip:
            return None

    # ------------------------------------------------------------ stages

    def _stages(self, decls: list[ast.StageDecl]) -> list[StageSpec]:
        by_name = {d.name.name: d for d in decls}
        lowered: dict[str, StageSpec] = {}
        for decl in decls:
            stage = self._guard(self._stage, decl)
            if stage is not None:
                lowered.setdefault(decl.name.name, stage)
        for decl in decls:
            for dep in decl.after:
                if dep.name not in by_name:
                    self._guard(lambda: (_ for _ in ()).throw(
                        self._unknown("unknown-stage", dep.span, dep.name, by_name)))
        return [lowered[n] for n in self._stage_order(decls, by_name) if n in lowered]

    def _stage_order(self, decls, by_name) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name):] + (name,))
                self.err("stage-cycle", by_name[name].name.span, f"stage dependencies form a cycle: {cycle}")
                return
            state[name] = 1
            for dep in by_name[name].after:
                if dep.name in by_name:
                    visit(dep.name, path + (name,))
            state[name] = 2
            order.append(name)

        for d in decls:
            visit(d.name.name, ())
        return order

    def _stage(self, decl: ast.StageDecl) -> StageSpec:
        # every key is read under its own guard so that one bad value does not hide the errors of the others
        errors_before = len(self.d.errors)
        opts = self._block(decl.options, B.STAGE_KEYS, "stage")
        for key in ("data", "loss"):
            if key not in opts and not self._near_miss(decl.options, key):
                self.err("missing-option", decl.options.span, f"stage '{decl.name.name}' needs '{key}'")
        data = self._guard(self._data_name, opts["data"]) if "data" in opts else None
        fields: dict[str, Any] = self._guard(self._duration, decl, opts) or {}
        for key in ("batch", "micro_batch", "seq_len", "eval_every", "save_every"):
            if key in opts:
                value = self._guard(self._int, opts[key], key, 1)
                if value is not None:
                    fields[key] = value
        if "micro_batch" in fields and fields["micro_batch"] > fields.get("batch", 32):
            self.err("bad-value", opts["micro_batch"].span, "micro_batch is larger than the global batch")
        readers = {"activation_checkpointing": lambda e: self._bool(e, "activation_checkpointing"),
                   "optimizer": self._optimizer, "schedule": self._lr_schedule}
        for key, read in readers.items():
            if key in opts:
                value = self._guard(read, opts[key])
                if value is not None:
                    fields[key] = value
        objective = self._guard(self._objective, opts["loss"]) if "loss" in opts else None
        staged = self._guard(self._stage_terms, objective, decl, data) if objective is not None else None
        if len(self.d.errors) > errors_before or staged is None or data is None:
            raise _Skip()
        terms, students, teachers = staged
        fields.update(self._guard(self._stage_interventions, objective, opts, fields, data) or {})
        if len(self.d.errors) > errors_before:
            raise _Skip()
        teachers += [m for iv in objective.interventions for m in iv.models
                     if m not in students and m not in teachers and self.models[m].role != "student"]
        return StageSpec(name=decl.name.name, after=[a.name for a in decl.after], data=data, loss=terms,
                         interventions=list(objective.interventions), students=students, teachers=teachers,
                         span=decl.span, **fields)

    def _duration(self, decl: ast.StageDecl, opts: dict[str, ast.Expr]) -> dict[str, Any]:
        if "steps" in opts and "epochs" in opts:
            raise self.err("conflicting-options", opts["epochs"].span, "give either steps or epochs, not both")
        if "steps" in opts:
            return {"steps": self._int(opts["steps"], "steps", minimum=1)}
        if "epochs" in opts:
            epochs = self._num(opts["epochs"], "epochs")
            if epochs <= 0:
                raise self.err("bad-duration", opts["epochs"].span, "epochs must be positive")
            return {"epochs": epochs}
        if self._near_miss(decl.options, "steps") or self._near_miss(decl.options, "epochs"):
            raise _Skip()  # a misspelt key, already reported as unknown-option with a did-you-mean
        raise self.err("bad-duration", decl.options.span, f"stage '{decl.name.name}' needs steps or epochs")

    def _objective(self, expr: ast.Expr) -> Objective:
        objective = self.ev(expr, Scope(self.lets))
        if isinstance(objective, Symbol):
            raise self._unknown_value(objective)
        if not isinstance(objective, Objective):
            raise self.err("type-mismatch", expr.span, f"loss must be a loss expression, e.g. "
                           f"kl(teacher.logits, student.logits, T: 2), not {_kind(objective)}")
        return objective

    @staticmethod
    def _near_miss(block: ast.Block | None, key: str) -> bool:
        """True if the block has an unknown key that looks like ``key`` (a typo reported on its own)."""
        if block is None:
            return False
        return any(e.key.name != key and did_you_mean(e.key.name, [key]) for e in block.entries)

    def _stage_terms(self, objective: Objective, decl: ast.StageDecl, data: str):
        students: list[str] = []
        teachers: list[str] = []
        terms: list[LossTerm] = []
        ids: dict[str, int] = {}
        has_labels = self.data[data].label is not None if data in self.data else True
        for term in objective.terms:
            for side in (term.target, term.pred):
                if side.feat.kind == "labels" and not has_labels:
                    raise self.err("no-labels", side.span, f"loss reads labels but data '{data}' has no label "
                                   "column", "add `label: <column>` to the data block")
            for m in _node_models(term.pred.node):
                if m not in students:
                    students.append(m)
            for m in _node_models(term.target.node):
                if m not in teachers:
                    teachers.append(m)
            base = f"{term.method + '/' if term.method else ''}{term.fn}[{_describe(term.pred)}<-{_describe(term.target)}]"
            n = ids.get(base, 0)
            ids[base] = n + 1
            terms.append(LossTerm(id=base if n == 0 else f"{base}#{n}", fn=term.fn, target=term.target.node,
                                  pred=term.pred.node, options=term.options, mask=term.mask, weight=term.weight,
                                  gate=term.gate, method=term.method, span=term.span))
        teachers = [t for t in teachers if t not in students]
        if not terms:
            raise self.err("missing-option", decl.options.span, f"stage '{decl.name.name}' has no loss term")
        uses_teacher = any(self.models[m].role != "student" for iv in objective.interventions for m in iv.models
                           if m not in students)
        if not teachers and not uses_teacher:
            self.d.report("no-teacher-signal", decl.name.span, f"stage '{decl.name.name}' reads no teacher signal: "
                          "it trains the student on the data alone", "fine for a warm-up or fine-tuning stage; "
                          "distillation needs a teacher signal as the first argument of a loss")
        return terms, students, teachers

    def _stage_interventions(self, objective: Objective, opts: dict[str, ast.Expr], fields: dict[str, Any],
                             data: str) -> dict[str, Any]:
        """Checks of interventions against each other and the stage's keys; returns forced stage fields."""
        ivs = objective.interventions
        forced: dict[str, Any] = {}
        rewriting = [iv for iv in ivs if iv.kind in B.INTERVENTIONS and B.INTERVENTIONS[iv.kind].rewrites_forward]
        if len(rewriting) > 1:
            a, b = rewriting[0], rewriting[1]
            raise self.err("incompatible-methods", b.span, f"{b.kind} and {a.kind} both rewrite the student's "
                           "forward pass; one stage can run only one of them", "split them into two stages",
                           related=[(a.span, f"{a.kind} is here")])
        ranks = self.cluster.nodes * self.cluster.gpus_per_node if self.cluster else 1
        batch = fields.get("batch", 32)
        for iv in ivs:
            if iv.kind == "interchange":
                forced.update(self._check_interchange(iv, opts, fields))
            elif iv.kind == "perturb":
                forced.update(self._check_perturb(iv, opts, fields, ranks, batch))
            elif iv.kind == "weigh":
                self._check_weigh(iv, opts, fields, ranks, batch, data)
        return forced

    def _check_interchange(self, iv: Intervention, opts, fields) -> dict[str, Any]:
        # DIITO backpropagates through the swapped states; recomputing them under checkpointing breaks that
        if fields.get("activation_checkpointing") is True:
            raise self.err("interchange-checkpointing", opts["activation_checkpointing"].span,
                           "interchange (DIITO) cannot run with activation checkpointing: the swapped states must "
                           "stay in the graph", "remove `activation_checkpointing: true` from this stage",
                           related=[(iv.span, "interchange is here")])
        return {"activation_checkpointing": False}

    def _check_perturb(self, iv: Intervention, opts, fields, ranks: int, batch: int) -> dict[str, Any]:
        # pass 1's gradients are discarded, which accumulated micro-batch gradients cannot survive
        micro = fields.get("micro_batch")
        if micro is not None and micro * ranks < batch:
            raise self.err("perturb-accumulation", opts["micro_batch"].span,
                           f"gradient perturbation needs one micro-batch per step, but micro_batch {micro} x "
                           f"{ranks} rank{'s' if ranks != 1 else ''} < batch {batch} means gradient accumulation",
                           f"set micro_batch: {batch // ranks} (or remove it and let the planner choose)",
                           related=[(iv.span, "perturb is here")])
        return {"grad_accum_allowed": False}

    def _check_weigh(self, iv: Intervention, opts, fields, ranks: int, batch: int, data: str) -> None:
        params = iv.params
        if params.get("needs_labels") and data in self.data and self.data[data].label is None:
            raise self.err("no-labels", iv.span, f"weigh(by: teacher_ce) needs labels but data '{data}' has none",
                           "add `label: <column>` to the data block")
        n = len(params["units"])
        if not params.get("hard"):
            return
        micro = fields.get("micro_batch")
        per_rank = micro if micro is not None else batch // max(ranks, 1)
        if per_rank < n:
            where = opts["micro_batch"].span if micro is not None else (opts.get("batch") or opts["loss"]).span
            what = f"micro_batch {micro}" if micro is not None else f"batch {batch} over {ranks} ranks"
            raise self.err("batch-too-small", where, f"hard selection splits each micro-batch across {n} teachers, "
                           f"but {what} leaves {per_rank} example{'s' if per_rank != 1 else ''} per rank",
                           f"use at least {n} examples per rank and micro-batch", related=[(iv.span, "weigh is here")])

    def _optimizer(self, expr: ast.Expr) -> OptimizerSpec:
        if isinstance(expr, ast.Name):
            expr = ast.Call(expr.span, expr, (), ())
        if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
            raise self.err("type-mismatch", expr.span, "optimizer is adamw(lr: ..., betas: (..), weight_decay: ..)")
        name = expr.func.id
        if name not in B.OPTIMIZERS:
            raise self.err("unknown-function", expr.func.span, f"unknown optimizer '{name}'",
                           did_you_mean(name, B.OPTIMIZERS) or f"optimizers: {', '.join(B.OPTIMIZERS)}")
        self._arity(expr, 0, name)
        kw = self._kwargs(expr, B.OPTIMIZER_KEYS)
        fields: dict[str, Any] = {"name": name}
        for key in ("lr", "eps", "weight_decay"):
            if key in kw:
                fields[key] = self._num(kw[key], key)
                if fields[key] < 0 or (key == "lr" and fields[key] == 0):
                    raise self.err("bad-value", kw[key].span, f"{key} must be positive")
        if "betas" in kw:
            betas = kw["betas"]
            if not isinstance(betas, ast.Tuple) or len(betas.items) != 2:
                raise self.err("type-mismatch", betas.span, "betas is a pair: (0.9, 0.98)")
            pair = tuple(self._num(b, "betas") for b in betas.items)
            if not all(0 <= b < 1 for b in pair):
                raise self.err("bad-value", betas.span, "betas must lie in [0, 1)")
            fields["betas"] = pair
        return OptimizerSpec(**fields)

    def _lr_schedule(self, expr: ast.Expr) -> LRScheduleSpec:
        if isinstance(expr, ast.Name):
            expr = ast.Call(expr.span, expr, (), ())
        if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
            raise self.err("type-mismatch", expr.span, "schedule is constant, linear(warmup: 5%) or cosine(...)")
        name = expr.func.id
        if name not in B.LR_SCHEDULES:
            raise self.err("unknown-function", expr.func.span, f"unknown learning-rate schedule '{name}'",
                           did_you_mean(name, B.LR_SCHEDULES) or f"schedules: {', '.join(B.LR_SCHEDULES)}")
        self._arity(expr, 0, name)
        kw = self._kwargs(expr, B.LR_SCHEDULE_KEYS)
        fields: dict[str, Any] = {"kind": name}
        if "warmup" in kw:
            fields["warmup"] = self._fraction(kw["warmup"], "warmup")
        if "min_lr" in kw:
            fields["min_lr"] = self._num(kw["min_lr"], "min_lr")
        return LRScheduleSpec(**fields)

    def _final_checks(self, decls, stages: list[StageSpec]) -> None:
        if not any(isinstance(d, ast.ModelDecl) and d.role in ("student", "assistant") for d in decls):
            self.err("no-student", self.module.span if decls else None,
                     "the spec declares no student (student <name> = like(<teacher>) { ... })")
        stage_decls = [d for d in decls if isinstance(d, ast.StageDecl)]
        if not stage_decls:
            self.err("no-stages", self.module.span if decls else None, "the spec declares no stage")
        for name, decl in self.model_decls.items():
            if name not in self.used and name in self.models and self.models[name].role == "teacher":
                self.err("unused-definition", decl.name.span, f"teacher '{name}' is never used")
        for name, decl in self.data_decls.items():
            if name not in self.used:
                self.err("unused-definition", decl.name.span, f"data '{name}' is never used")

    # ------------------------------------------------------------ expression interpreter

    def ev(self, expr: ast.Expr, scope: Scope) -> Any:
        method = getattr(self, "_ev_" + type(expr).__name__)
        return method(expr, scope)

    def _ev_Number(self, e: ast.Number, scope: Scope) -> NumVal:
        v = number_value(e.text)
        if not math.isfinite(v.value):  # 1e400: every later int() or comparison would misbehave
            raise self.err("bad-number", e.span, f"number {e.text} is too large")
        return NumVal(v.value, v.unit, e.span)

    def _ev_String(self, e: ast.String, scope: Scope) -> str:
        return e.value

    def _ev_Bool(self, e: ast.Bool, scope: Scope) -> bool:
        return e.value

    def _ev_HwSpec(self, e: ast.HwSpec, scope: Scope) -> Any:
        raise self.err("type-mismatch", e.span, "a device spec like '8 x A100-40GB' belongs in the cluster block")

    def _ev_Tuple(self, e: ast.Tuple, scope: Scope) -> tuple:
        return tuple(self.ev(x, scope) for x in e.items)

    def _ev_List(self, e: ast.List, scope: Scope) -> list:
        return [self.ev(x, scope) for x in e.items]

    def _ev_Name(self, e: ast.Name, scope: Scope) -> Any:
        n = e.id
        if n in scope.values:
            return scope.values[n]
        if n in self.lets:
            return self.lets[n]
        if n in self.models:
            self.used.add(n)
            return ModelRef(n)
        if n in self.model_decls:
            raise _Skip()  # declared but failed to resolve: already reported
        if n in self.data or n in self.data_decls:
            self.used.add(n)
            return DataRef(n)
        if n in B.TARGETS:
            feat = Feat(kind=n)
            return ItemSet((Item(SignalNode(model=None, kind=n), feat, None, None, e.span),), span=e.span)
        if n in B.LAYER_MAPS and n != "pairs":
            return LayerMap(n, span=e.span)
        return Symbol(n, e.span)

    def _ev_Attr(self, e: ast.Attr, scope: Scope) -> Any:
        if isinstance(e.obj, ast.Name) and e.obj.id in self.libraries and e.obj.id not in scope.values:
            lib = self.libraries[e.obj.id]
            if e.name.name not in lib:
                raise self.err("unknown-method", e.name.span, f"library '{e.obj.id}' has no method '{e.name.name}'",
                               did_you_mean(e.name.name, lib) or f"it has: {', '.join(sorted(lib))}")
            return lib[e.name.name]
        obj = self.ev(e.obj, scope)
        if isinstance(obj, Symbol):
            raise self._unknown_value(obj)
        if isinstance(obj, list) and obj and all(isinstance(m, ModelRef) for m in obj):
            names = [m.name for m in obj]
            if len(set(names)) != len(names):
                raise self.err("bad-value", e.obj.span, f"a list of models names '{next(n for n in names if names.count(n) > 1)}' twice")
            return PerModel(self._signal(m.name, e.name, e.span) for m in obj)  # one signal per model of the list
        if not isinstance(obj, ModelRef):
            raise self.err("type-mismatch", e.obj.span, f"'.{e.name.name}' needs a model on its left")
        return self._signal(obj.name, e.name, e.span)

    def _signal(self, model: str, attr: ast.Ident, span: Span) -> ItemSet:
        kind = attr.name
        if kind not in B.SIGNALS:
            raise self.err("unknown-signal", attr.span, f"models have no signal '{kind}'",
                           did_you_mean(kind, B.SIGNALS) or f"signals: {', '.join(B.SIGNALS)}")
        spec = self.models[model]
        layered = B.SIGNALS[kind][0]
        if not layered:
            return ItemSet((self._signal_item(spec, kind, None, span),), span=span)
        items = tuple(self._signal_item(spec, kind, i, span) for i in range(spec.arch.num_layers))
        return ItemSet(items, layered=True, span=span)

    def _signal_item(self, spec: ModelSpec, kind: str, layer: int | None, span: Span) -> Item:
        a = spec.arch
        if kind == "cls":
            node = OpNode(op="pool", inputs=[SignalNode(model=spec.name, kind="hidden", layer=layer)],
                          params={"how": "cls"})
            return Item(node, Feat("pooled", dim=a.hidden_size), spec.name, layer, span)
        node = SignalNode(model=spec.name, kind=kind, layer=layer)
        fk = _SIGNAL_FEAT_KIND[kind]
        if fk == "hidden":
            feat = Feat("hidden", dim=a.hidden_size)
        elif fk == "attn":
            feat = Feat("attn", heads=a.num_heads, probs=kind == "attn_probs")
        elif kind == "query":
            feat = Feat("qkv", dim=a.num_heads * a.head_dim)
        elif kind in ("key", "value"):
            feat = Feat("qkv", dim=a.num_kv_heads * a.head_dim)
        elif kind == "ffn":
            feat = Feat("qkv", dim=a.intermediate_size)
        elif kind == "logits":
            if spec.head.kind != "lm":
                raise self.err("no-task-head", span, f"'{spec.name}' has a {spec.head.kind} head, not an LM head")
            feat = Feat("logits", vocab=self._vocab_space(spec.name))
        else:  # task_logits
            if spec.head.kind != "classify":
                raise self.err("no-task-head", span, f"'{spec.name}.task_logits' needs a classification head",
                               f"add `head: classify(<labels>)` to the declaration of '{spec.name}'")
            feat = Feat("task_logits", classes=spec.head.num_labels)
        return Item(node, feat, spec.name, layer, span)

    def _vocab_space(self, model: str) -> str:
        spec = self.models[model]
        if spec.vocab:
            return f"vocab:{spec.vocab}"
        while spec.base is not None and "vocab" not in spec.overrides:
            spec = self.models[spec.base]
        return f"{spec.arch.model_type}:{spec.arch.vocab_size}:{spec.name if 'vocab' in spec.overrides else ''}"

    def _ev_Index(self, e: ast.Index, scope: Scope) -> ItemSet:
        base = self.ev(e.obj, scope)
        if isinstance(base, PerModel):
            return PerModel(self._index(e, b, scope) for b in base)
        return self._index(e, base, scope)

    def _index(self, e: ast.Index, base: Any, scope: Scope) -> ItemSet:
        if isinstance(base, Symbol):
            raise self._unknown_value(base)
        if not (isinstance(base, ItemSet) and base.layered):
            raise self.err("bad-index", e.span, "only layered signals (hidden, attn_scores, attn_probs, "
                           "query, key, value, ffn, cls) take a layer index")
        n = len(base.items)
        model = base.items[0].model
        chosen: list[int] = []
        for item in e.items:
            chosen.extend(self._layer_indices(item, n, model, scope))
        if not chosen:  # an empty slice would pair nothing and hide the mistake
            raise self.err("bad-index", e.span, f"this index selects no layer of '{model}' ({n} layers)")
        items = tuple(base.items[i] for i in chosen)
        return ItemSet(items, layered=True, span=e.span)

    def _layer_indices(self, item, n: int, model: str | None, scope: Scope) -> list[int]:
        if isinstance(item, ast.Star):
            return list(range(n))
        if isinstance(item, ast.Slice):
            parts = [None if x is None else self._index_int(x, scope) for x in (item.start, item.stop, item.step)]
            if parts[2] == 0:
                raise self.err("bad-index", item.span, "slice step cannot be zero")
            for p, x in zip(parts[:2], (item.start, item.stop)):
                if p is not None and not -n <= p <= n:
                    raise self._out_of_range(x.span, p, n, model)
            return list(range(n))[slice(*parts)]
        i = self._index_int(item, scope)
        if not -n <= i < n:
            raise self._out_of_range(item.span, i, n, model)
        return [i % n]

    def _out_of_range(self, span: Span, i: int, n: int, model: str | None) -> _Skip:
        return self.err("layer-out-of-range", span, f"layer {i} is out of range: '{model}' has {n} layers "
                        f"(valid: 0..{n - 1} or -{n}..-1)")

    def _index_int(self, expr: ast.Expr, scope: Scope) -> int:
        v = self.ev(expr, scope)
        if not isinstance(v, NumVal) or v.unit is not None or v.value != int(v.value):
            raise self.err("bad-index", expr.span, "a layer index must be an integer")
        return int(v.value)

    def _ev_Neg(self, e: ast.Neg, scope: Scope) -> NumVal:
        v = self.ev(e.operand, scope)
        if not isinstance(v, NumVal):
            raise self.err("type-mismatch", e.span, "only numbers can be negated")
        return NumVal(-v.value, v.unit, e.span)

    def _ev_BinOp(self, e: ast.BinOp, scope: Scope) -> Any:
        left, right = self.ev(e.left, scope), self.ev(e.right, scope)
        for side in (left, right):
            if isinstance(side, Symbol):
                raise self._unknown_value(side)
        if isinstance(left, NumVal) and isinstance(right, NumVal):
            return self._arith(e, left, right)
        if e.op == "+" and isinstance(left, Objective) and isinstance(right, Objective):
            return Objective(left.terms + right.terms, left.interventions + right.interventions)
        weight_span = e.right.span
        if e.op == "*" and isinstance(right, Objective):
            left, right, weight_span = right, left, e.left.span
        if e.op in ("*", "/") and isinstance(left, Objective):
            weight = self._weight(right, weight_span)
            if e.op == "/":
                if weight.kind != "constant" or weight.value == 0:
                    raise self.err("bad-weight", e.right.span, "an objective can only be divided by a non-zero number")
                weight = Schedule(value=1.0 / weight.value)
            try:
                return Objective(tuple(t.scaled(weight) for t in left.terms), left.interventions)
            except WeightError as exc:
                raise self.err("bad-weight", e.span, str(exc))
        if isinstance(left, Schedule) or isinstance(right, Schedule):
            return self._schedule_arith(e, left, right)
        raise self.err("type-mismatch", e.span, f"'{e.op}' cannot combine {_kind(left)} and {_kind(right)}")

    def _arith(self, e: ast.BinOp, a: NumVal, b: NumVal) -> NumVal:
        if e.op == "/" and b.value == 0:
            raise self.err("bad-value", e.right.span, "division by zero")
        ops = {"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value,
               "/": a.value / b.value if b.value else 0.0}
        if e.op == "^":
            try:
                value = a.value ** b.value
            except (OverflowError, ZeroDivisionError):
                raise self.err("bad-value", e.span, "number too large or undefined (0 to a negative power)")
            if not isinstance(value, float) or not math.isfinite(value):  # (-8) ^ 0.5 is complex
                raise self.err("bad-value", e.span, "power has no real finite value")
            return NumVal(value, None, e.span)
        if not math.isfinite(ops[e.op]):
            raise self.err("bad-value", e.span, "number too large")
        return NumVal(ops[e.op], a.unit if a.unit == b.unit else None, e.span)

    def _schedule_arith(self, e: ast.BinOp, a: Any, b: Any) -> Schedule:
        if e.op != "*":
            raise self.err("bad-weight", e.span, f"'{e.op}' with a schedule: only multiplication by a number works")
        try:
            return mul_schedules(self._weight(a, e.left.span), self._weight(b, e.right.span))
        except WeightError as exc:
            raise self.err("bad-weight", e.span, str(exc))

    def _weight(self, v: Any, span: Span) -> Schedule:
        if isinstance(v, NumVal) and v.unit is None:
            if v.value < 0:
                raise self.err("negative-weight", span, f"loss weight {_fmt(v.value)} is negative")
            return Schedule(value=v.value)
        if isinstance(v, NumVal) and v.unit == "percent":
            return Schedule(value=v.value)
        if isinstance(v, Schedule):
            if min(v.value, v.end if v.end is not None else v.value) < 0:
                raise self.err("negative-weight", span, "a weight schedule goes below zero")
            return v
        raise self.err("type-mismatch", span, f"a loss weight must be a number or a schedule, not {_kind(v)}")

    def _ev_Where(self, e: ast.Where, scope: Scope) -> Objective:
        obj = self.ev(e.expr, scope)
        if not isinstance(obj, Objective):
            raise self.err("type-mismatch", e.span, "'where' applies to a loss expression")
        parts = []
        for atom in e.mask:
            if atom.name.name not in B.MASKS:
                raise self.err("unknown-mask", atom.name.span, f"unknown mask '{atom.name.name}'",
                               did_you_mean(atom.name.name, B.MASKS) or f"masks: {', '.join(B.MASKS)}")
            parts.append(("not " if atom.negated else "") + atom.name.name)
        mask = " and ".join(parts)
        return Objective(tuple(t if t.mask else replace(t, mask=mask) for t in obj.terms), obj.interventions)

    def _ev_Call(self, e: ast.Call, scope: Scope) -> Any:
        if isinstance(e.func, ast.Name) and e.func.id not in scope.values:
            name = e.func.id
            if name in B.LOSSES:
                return self._loss(e, name, scope)
            if name in B.TRANSFORMS:
                return self._transform(e, name, scope)
            if name in B.SCHEDULES:
                return self._schedule(e, name, scope)
            if name in B.TRIGGERS:
                return self._trigger(e, name, scope)
            if name == "pairs":
                return self._pairs(e, scope)
            if name in self.methods:
                return self._call_method(self.methods[name], e, scope)
            if name in self.libraries and name in self.libraries[name]:
                return self._call_method(self.libraries[name][name], e, scope)
            if name in B.COMBINATORS:
                return getattr(self, "_c_" + name)(e, scope)
            if name in B.INTERVENTIONS:
                return getattr(self, "_iv_" + name)(e, scope)
            candidates = [*B.LOSSES, *B.TRANSFORMS, *B.SCHEDULES, *B.TRIGGERS, *self.methods, "pairs", *B.COMBINATORS,
                          *B.INTERVENTIONS,
                          *(lib for lib in self.libraries if lib in self.libraries[lib])]
            hint = did_you_mean(name, candidates) or _stdlib_hint(name, self.libraries)
            if name in self.libraries:
                hint = f"library '{name}' has no method '{name}'; it has: {', '.join(sorted(self.libraries[name]))}"
            raise self.err("unknown-method" if name not in ("hf", "like") else "type-mismatch", e.func.span,
                           f"unknown function or method '{name}'", hint)
        target = self.ev(e.func, scope)
        if isinstance(target, MethodDef):
            return self._call_method(target, e, scope)
        raise self.err("type-mismatch", e.func.span, "only functions and methods can be called")

    # ------------------------------------------------------------ methods

    def _call_method(self, m: MethodDef, e: ast.Call, scope: Scope) -> Objective:
        if m.qualname in scope.stack:
            raise self.err("method-recursion", e.span, f"method '{m.qualname}' calls itself "
                           f"({' -> '.join(scope.stack + (m.qualname,))})")
        params = m.decl.params
        if len(e.args) > len(params):
            raise self.err("bad-arity", e.span, f"'{m.qualname}' takes {len(params)} arguments, got {len(e.args)}")
        bound: dict[str, Any] = {}
        for p, a in zip(params, e.args):
            bound[p.name.name] = self.ev(a, scope)
        names = [p.name.name for p in params]
        for kw in e.kwargs:
            key = kw.key.name
            if key not in names:
                raise self.err("unknown-option", kw.key.span, f"'{m.qualname}' has no parameter '{key}'",
                               did_you_mean(key, names) or f"parameters: {', '.join(names)}")
            if key in bound:
                raise self.err("duplicate-option", kw.key.span, f"parameter '{key}' given twice")
            bound[key] = self.ev(kw.value, scope)
        inner = Scope(dict(m.lets), scope.stack + (m.qualname,), m.qualname)
        for p in params:
            if p.name.name not in bound:
                if p.default is None:
                    raise self.err("bad-arity", e.span, f"'{m.qualname}' needs argument '{p.name.name}'")
                bound[p.name.name] = self.ev(p.default, Scope({**m.lets, **bound}, inner.stack, m.qualname))
        inner.values.update(bound)
        try:
            result = self.ev(m.decl.body, inner)
        except _Skip:
            # point at the call site too, so an error inside a library method is traceable to the user's line
            if self.d.items and self.d.items[-1].span and self.d.items[-1].span.file != e.span.file:
                last = self.d.items[-1]
                self.d.items[-1] = replace(last, related=last.related + ((e.span, f"in call of '{m.qualname}'"),))
            raise
        if not isinstance(result, Objective):
            raise self.err("type-mismatch", m.decl.body.span, f"method '{m.qualname}' must return a loss expression")
        return Objective(tuple(t if t.method else replace(t, method=m.qualname) for t in result.terms),
                         result.interventions)

    # ------------------------------------------------------------ schedules and maps

    def _schedule(self, e: ast.Call, name: str, scope: Scope) -> Schedule:
        if name == "stairs":
            return self._stairs(e, scope)
        if len(e.args) != 2:
            raise self.err("bad-arity", e.span, f"{name}(start, end, start: 0%, until: 100%) takes two values")
        a, b = (self._plain_number(x, scope) for x in e.args)
        kw = self._kwargs(e, {"start": "fraction", "until": "fraction", "at": "fraction"})
        start = self._fraction(kw["start"], "start", scope) if "start" in kw else 0.0
        until = self._fraction(kw["until"], "until", scope) if "until" in kw else 1.0
        if "at" in kw:
            start = until = self._fraction(kw["at"], "at", scope)
        if until < start:
            raise self.err("bad-value", e.span, "a schedule must end after it starts")
        return Schedule(kind=name, value=a, end=b, start=start, until=until)

    def _stairs(self, e: ast.Call, scope: Scope) -> Schedule:
        """stairs(a, b, levels: n, every: epoch): a to b in n equal steps, one per epoch (or step), then b."""
        if len(e.args) != 2:
            raise self.err("bad-arity", e.span, "stairs(start, end, levels: n, every: epoch) takes two values")
        a, b = (self._plain_number(x, scope) for x in e.args)
        kw = self._kwargs(e, {"levels": "int", "every": "symbol"})
        if "levels" not in kw:
            raise self.err("missing-option", e.span, "stairs(...) needs levels: <how many values>")
        levels = self._int(kw["levels"], "levels", minimum=1, scope=scope)
        every = self._every(kw, scope, "epoch")
        return Schedule(kind="stairs", value=a, end=b, levels=levels, every=every)

    def _pairs(self, e: ast.Call, scope: Scope) -> LayerMap:
        pairs = []
        for arg in e.args:
            v = self.ev(arg, scope)
            if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, NumVal) for x in v)):
                raise self.err("type-mismatch", arg.span, "pairs((student_layer, teacher_layer), ...)")
            pairs.append((int(v[0].value), int(v[1].value)))
        if not pairs:
            raise self.err("bad-arity", e.span, "pairs(...) needs at least one (student, teacher) pair")
        return LayerMap("pairs", tuple(pairs), e.span)

    # ------------------------------------------------------------ combinators: progressive, choose

    def _new_group(self, prefix: str) -> str:
        self._group_ids += 1
        return f"{prefix}{self._group_ids}"

    def _objective_arg(self, expr: ast.Expr, scope: Scope, fname: str) -> Objective:
        obj = self.ev(expr, scope)
        if isinstance(obj, Symbol):
            raise self._unknown_value(obj)
        if not isinstance(obj, Objective) or not obj.terms:
            raise self.err("type-mismatch", expr.span, f"{fname}(...) takes a loss expression, not {_kind(obj)}")
        return obj

    def _c_len(self, e: ast.Call, scope: Scope) -> NumVal:
        """len(x): how many items a list has (a list of teachers, of loss expressions, ...)."""
        self._arity(e, 1, "len")
        self._kwargs(e, {})
        v = self.ev(e.args[0], scope)
        if not isinstance(v, list):
            raise self.err("type-mismatch", e.args[0].span, f"len() takes a list, not {_kind(v)}")
        return NumVal(float(len(v)), None, e.span)

    def _c_progressive(self, e: ast.Call, scope: Scope) -> Objective:
        """progressive(objective, over: 80%): the terms of the i-th of n student layers count from i/n * over.

        ``exclusive: true`` ends each layer's window where the next one starts (MobileBERT's layer-by-layer
        transfer); ``below_lr: f`` adds a ``progressive_lr`` intervention: while block l is transferred, the
        blocks below it train at f times the learning rate (0 freezes them). ``until: plateau(...)`` unlocks
        the next layer when the current one's running loss stops improving (SID), through a ``plateau``
        intervention; ``over`` is then a deadline. ``then: y``: the terms of ``y`` replace the progressive
        terms once every layer has been unlocked (and, with ``until``, the last one has plateaued).
        """
        self._arity(e, 1, "progressive")
        obj = self._objective_arg(e.args[0], scope, "progressive")
        kw = self._kwargs(e, B.COMBINATORS["progressive"])
        over = self._fraction(kw["over"], "over", scope) if "over" in kw else 1.0
        exclusive = self._bool(kw["exclusive"], "exclusive", scope) if "exclusive" in kw else False
        keys: list[Any] = []
        for i, t in enumerate(obj.terms):  # terms of one student layer unlock together
            key = ("layer", t.pred.layer) if t.pred.layer is not None else ("term", i)
            if key not in keys:
                keys.append(key)
        n = len(keys)
        start = {k: round(over * i / n, 12) for i, k in enumerate(keys)}
        until = {k: (round(over * (i + 1) / n, 12) if i + 1 < n else 1.0) for i, k in enumerate(keys)}
        then = self._objective_arg(kw["then"], scope, "progressive(then: ...)") if "then" in kw else None
        if "until" in kw:
            if "below_lr" in kw:
                raise self.err("conflicting-options", kw["below_lr"].span, "below_lr needs the fixed layer windows "
                               "of over; with until: plateau(...) the windows are only known while training",
                               related=[(kw["until"].span, "until is here")])
            return self._progressive_until(e, kw, obj, keys, then, exclusive, over if "over" in kw else None, scope)
        terms = []
        for i, t in enumerate(obj.terms):
            key = ("layer", t.pred.layer) if t.pred.layer is not None else ("term", i)
            update = {"active_from": start[key]}
            if exclusive:
                update["active_until"] = until[key]
            if then is not None:  # the final phase replaces the progressive terms
                update["active_until"] = min(update.get("active_until", 1.0), over) if over < 1.0 else 1.0
            terms.append(replace(t, gate=t.gate.model_copy(update=update)))
        interventions = obj.interventions
        if then is not None:
            if over >= 1.0:
                raise self.err("bad-value", kw["then"].span, "progressive(..., then: y) needs over below 100% (y "
                               "starts at over) or until: plateau(...)")
            terms += [replace(t, gate=t.gate.model_copy(update={"active_from": max(t.gate.active_from, over)}))
                      for t in then.terms]
            interventions += then.interventions
        if "below_lr" in kw:
            interventions += (self._progressive_lr(e, kw["below_lr"], obj, keys, start, until, scope),)
        return Objective(tuple(terms), interventions)

    def _trigger(self, e: ast.Call, name: str, scope: Scope) -> Trigger:
        """plateau(patience: 3, min_delta: 0, window: 10, on: <loss>): the watched running loss stops improving."""
        self._arity(e, 0, name)
        kw = self._kwargs(e, B.TRIGGERS[name])
        patience = self._int(kw["patience"], "patience", minimum=1, scope=scope) if "patience" in kw else 3
        window = self._int(kw["window"], "window", minimum=1, scope=scope) if "window" in kw else 10
        min_delta = self._num(kw["min_delta"], "min_delta", scope) if "min_delta" in kw else 0.0
        if min_delta < 0:
            raise self.err("bad-value", kw["min_delta"].span, "min_delta must not be negative")
        on = None
        if "on" in kw:
            v = self.ev(kw["on"], scope)
            if not isinstance(v, Symbol) or v.name not in B.LOSSES:
                raise self.err("bad-value", kw["on"].span, "on names the loss whose running value is watched "
                               f"(one of {', '.join(B.LOSSES)})", did_you_mean(getattr(v, "name", ""), B.LOSSES))
            on = v.name
        return Trigger(name, {"patience": patience, "window": window, "min_delta": min_delta, "on": on}, e.span)

    def _progressive_until(self, e: ast.Call, kw: dict, obj: Objective, keys: list, then: Objective | None,
                           exclusive: bool, deadline: float | None, scope: Scope) -> Objective:
        trigger = self.ev(kw["until"], scope)
        if isinstance(trigger, Symbol):
            raise self._unknown_value(trigger)
        if not isinstance(trigger, Trigger):
            raise self.err("type-mismatch", kw["until"].span, f"until is a trigger such as plateau(patience: 3), "
                           f"not {_kind(trigger)}")
        pid = self._new_group("plateau")
        labels = [f"{pid}/{i}" for i in range(len(keys))]
        by_key = {}
        for i, t in enumerate(obj.terms):
            key = ("layer", t.pred.layer) if t.pred.layer is not None else ("term", i)
            by_key.setdefault(key, []).append(t)
        terms: list[Term] = []
        for key, label in zip(keys, labels):
            group = tuple(by_key[key])
            on = trigger.params["on"]
            if on is not None and not any(t.fn == on for t in group):
                raise self.err("bad-value", trigger.span, f"plateau(on: {on}) watches a loss that layer group "
                               f"{labels.index(label)} of progressive(...) does not have",
                               f"its losses: {', '.join(sorted({t.fn for t in group}))}")
            terms.extend(self._grouped(e, group, Gate(group=label)))
        interventions = obj.interventions
        then_label = None
        if then is not None:
            then_label = f"{pid}/then"
            terms.extend(self._grouped(e, then.terms, Gate(group=then_label)))
            interventions += then.interventions
        students = sorted({m for t in obj.terms for m in _node_models(t.pred.node)})
        n = len(keys)
        deadlines = None if deadline is None else [round(deadline * i / n, 12) for i in range(1, n + 1)]
        iv = Intervention(kind="plateau", models=students, span=e.span, params={
            "id": pid, "groups": labels, "then": then_label, "exclusive": exclusive, **trigger.params,
            "deadlines": deadlines,
            "meaning": "group 0 is unlocked first; after every `window` optimizer steps the mean (over the window, "
                       "and over data-parallel ranks) of the unweighted values of the current group's watched terms "
                       "(`on`, or all of them) is compared with its best so far: an improvement of more than "
                       "min_delta resets the count, anything else adds one; after `patience` windows without "
                       "improvement the next group unlocks (previous ones stay on unless exclusive). After the last "
                       "group plateaus the progressive terms stop and the `then` group starts. deadlines[i]: the "
                       "progress at which unlock i+1 happens at the latest (None: none)"})
        return Objective(tuple(terms), interventions + (iv,))

    def _progressive_lr(self, e: ast.Call, expr: ast.Expr, obj: Objective, keys, start, until,
                        scope: Scope) -> Intervention:
        factor = self._num(expr, "below_lr", scope)
        if not 0 <= factor <= 1:
            raise self.err("bad-value", expr.span, "below_lr is a learning-rate factor between 0 (frozen) and 1")
        students = sorted({t.pred.model for t in obj.terms if t.pred.model})
        windows = [{"from": start[k], "until": until[k], "layer": k[1]} for k in keys if k[0] == "layer"]
        if len(students) != 1 or not windows:
            raise self.err("type-mismatch", e.span, "progressive(..., below_lr: f) needs layered terms of one student")
        return Intervention(kind="progressive_lr", models=students, span=e.span, params={
            "model": students[0], "below_lr": factor, "windows": windows,
            "meaning": "during each window only `layer` trains at the full learning rate; blocks below it train "
                       "at below_lr times it (0: frozen)"})

    def _every(self, kw: dict, scope: Scope, default: str) -> str:
        if "every" not in kw:
            return default
        v = self.ev(kw["every"], scope)
        if not isinstance(v, Symbol) or v.name not in B.EVERY:
            raise self.err("bad-value", kw["every"].span, "every is step or epoch")
        return v.name

    def _c_choose(self, e: ast.Call, scope: Scope) -> Any:
        """choose(x, k, every: epoch): k random items of a layered signal, or k random terms of a loss."""
        self._arity(e, 2, "choose")
        kw = self._kwargs(e, B.COMBINATORS["choose"])
        count = self.ev(e.args[1], scope)  # a number, or a signal whose item count is taken (as many as)
        k = len(count.items) if isinstance(count, ItemSet) else self._int(e.args[1], "choose", minimum=1, scope=scope)
        every = self._every(kw, scope, "epoch")
        value = self.ev(e.args[0], scope)
        if isinstance(value, Objective) and value.terms:
            if k > len(value.terms):
                raise self.err("bad-value", e.args[1].span, f"choose {k} of {len(value.terms)} terms")
            group = self._new_group("choose")
            gate = Gate(group=group, choose=k, every=every)
            return Objective(self._grouped(e, value.terms, gate), value.interventions)
        xs = self._items(e.args[0], scope, "choose")
        if k > len(xs.items):
            raise self.err("bad-value", e.args[1].span, f"choose {k} of {len(xs.items)} items")
        if len({(it.feat.kind, it.feat.dim) for it in xs.items}) != 1:
            raise self.err("shape-mismatch", e.span, "choose() needs items of one kind and width")
        group = self._new_group("choose")
        inputs = [it.node for it in xs.items]
        first = xs.items[0]
        # item i is the i-th smallest of the k indices drawn, so a layered pairing keeps the depth order
        items = tuple(Item(OpNode(op="choose", inputs=inputs, params={
            "group": group, "k": k, "index": i, "every": every, "order": "ascending"}), first.feat, first.model, i,
            e.span) for i in range(k))
        return ItemSet(items, layered=True, span=e.span)

    def _grouped(self, e: ast.Call, terms: tuple[Term, ...], gate: Gate) -> tuple[Term, ...]:
        """Put terms in one sampling group; a term holds one group only (Gate.group)."""
        for t in terms:
            if t.gate.group is not None:
                raise self.err("incompatible-methods", e.span, f"a term of this expression is already in sampling "
                               f"group '{t.gate.group}': terms can be chosen, dropped or weighed by one construct",
                               "apply the constructs to different terms",
                               related=[(t.span, f"term already grouped by '{t.gate.group}'")])
        return tuple(replace(t, gate=t.gate.model_copy(update={"group": gate.group, "choose": gate.choose,
                                                               "every": gate.every})) for t in terms)

    # ------------------------------------------------------------ interventions

    def _model_arg(self, expr: ast.Expr, scope: Scope, what: str) -> str:
        """A model given by name or through a method parameter."""
        v = self.ev(expr, scope)
        if isinstance(v, Symbol):
            raise self._unknown("unknown-model", expr.span, v.name, self.models)
        if not isinstance(v, ModelRef):
            raise self.err("type-mismatch", expr.span, f"{what} is a model, not {_kind(v)}")
        return v.name

    def _role_model(self, expr: ast.Expr, roles: tuple[str, ...], what: str, scope: Scope) -> str:
        name = self._model_arg(expr, scope, what)
        if self.models[name].role not in roles:
            code = "no-gradient" if "teacher" not in roles else "type-mismatch"
            raise self.err(code, expr.span, f"{what} must be a {' or '.join(roles)}, and '{name}' is a "
                           f"{self.models[name].role}")
        return name

    def _iv_replace_layers(self, e: ast.Call, scope: Scope) -> Objective:
        """replace_layers(t, s, p: schedule): Theseus. Student block j stands for teacher blocks j*k..(j+1)*k-1."""
        self._arity(e, 2, "replace_layers")
        kw = self._kwargs(e, B.INTERVENTIONS["replace_layers"].options)
        t = self._role_model(e.args[0], ("teacher", "assistant"), "replace_layers' first argument", scope)
        s = self._role_model(e.args[1], ("student", "assistant"), "replace_layers' second argument", scope)
        ta, sa = self.models[t].arch, self.models[s].arch
        rel = [(e.args[0].span, f"teacher '{t}': {ta.num_layers} x {ta.hidden_size}"),
               (e.args[1].span, f"student '{s}': {sa.num_layers} x {sa.hidden_size}")]
        if ta.num_layers < sa.num_layers or ta.num_layers % sa.num_layers:
            raise self.err("bad-layer-map", e.span, f"replace_layers groups the teacher's {ta.num_layers} blocks into "
                           f"{sa.num_layers} equal modules: the teacher's depth must be a multiple of the student's",
                           related=rel)
        if ta.hidden_size != sa.hidden_size:
            raise self.err("dim-mismatch", e.span, f"replace_layers runs teacher and student blocks in one residual "
                           f"stream: widths {ta.hidden_size} and {sa.hidden_size} differ", related=rel)
        p = self._probability(kw.get("p"), "p", scope, e) 
        k = ta.num_layers // sa.num_layers
        groups = [list(range(j * k, (j + 1) * k)) for j in range(sa.num_layers)]
        iv = Intervention(kind="replace_layers", models=[t, s], span=e.span, params={
            "teacher": t, "student": s, "groups": groups, "p": p.model_dump(), "every": "step",
            "draw": "per student block", "teacher_frozen": True, "teacher_forward": False,
            "meaning": "each step, student block j replaces teacher blocks groups[j] with probability p (else the "
                       "frozen teacher blocks run in its place); embeddings and head are the student's"})
        return Objective((), (iv,))

    def _probability(self, expr: ast.Expr | None, key: str, scope: Scope, e: ast.Call) -> Schedule:
        if expr is None:
            raise self.err("missing-option", e.span, f"{key} is required, e.g. {key}: linear(0.3, 1, until: 66%)")
        p = self._option(expr, key, "schedule", scope)
        if p.kind == "stairs":
            raise self.err("bad-value", expr.span, f"{key} follows the stage's progress: use linear, cosine or step "
                           "(stairs schedules count epochs or steps and apply to loss options and weights)")
        if not all(0 <= v <= 1 for v in (p.value, p.end if p.end is not None else p.value)):
            raise self.err("bad-value", expr.span, f"{key} is a probability between 0 and 1")
        return p

    def _iv_interchange(self, e: ast.Call, scope: Scope) -> Objective:
        """interchange(objective, fraction: 30%, map: uniform, way: consecutive): DIITO's counterfactual terms."""
        self._arity(e, 1, "interchange")
        obj = self._objective_arg(e.args[0], scope, "interchange")
        kw = self._kwargs(e, B.INTERVENTIONS["interchange"].options)
        fraction = self._fraction(kw["fraction"], "fraction", scope) if "fraction" in kw else 0.3
        if fraction <= 0:
            raise self.err("bad-value", kw["fraction"].span, "fraction must be above 0%")
        way = self._symbol_value(kw.get("way"), "way", B.INTERCHANGE_WAYS, scope, "consecutive")
        teachers = sorted({m for t in obj.terms for m in _node_models(t.target.node)})
        students = sorted({m for t in obj.terms for m in _node_models(t.pred.node)})
        if len(teachers) != 1 or len(students) != 1:
            raise self.err("type-mismatch", e.args[0].span, "interchange(...) takes terms between one teacher and one "
                           f"student (got teachers {teachers or 'none'}, students {students or 'none'})")
        t, s = teachers[0], students[0]
        lmap = self.ev(kw["map"], scope) if "map" in kw else LayerMap("uniform", span=e.span)
        if not isinstance(lmap, LayerMap):
            raise self.err("bad-layer-map", kw["map"].span, "map is uniform, skip, last, first or pairs(...)")
        lt, ls = self.models[t].arch.num_layers, self.models[s].arch.num_layers
        layers = [[j, i] for j in range(ls) if (i := self._map_layer(lmap, j, ls, lt, e)) is not None]
        group = self._new_group("interchange")
        terms = tuple(replace(term, target=self._wrap(term.target, "interchanged", group),
                              pred=self._wrap(term.pred, "interchanged", group)) for term in obj.terms)
        iv = Intervention(kind="interchange", models=[t, s], span=e.span, params={
            "id": group, "teacher": t, "student": s, "layers": layers, "layer_choice": "one pair at random per step",
            "fraction": fraction, "way": way, "source": "next example in the batch (roll by one)",
            "meaning": "a second forward of both models in which the states of `fraction` of the token positions "
                       "(contiguous when way is consecutive) at an aligned layer pair [student, teacher] are "
                       "replaced by the source example's; ops 'interchanged' read that pass"})
        return Objective(terms, obj.interventions + (iv,))

    @staticmethod
    def _wrap(it: Item, op: str, group: str) -> Item:
        return replace(it, node=OpNode(op=op, inputs=[it.node], params={"intervention": group}))

    def _symbol_value(self, expr: ast.Expr | None, key: str, allowed, scope: Scope, default: str) -> str:
        if expr is None:
            return default
        v = self.ev(expr, scope)
        if not isinstance(v, Symbol) or v.name not in allowed:
            raise self.err("bad-value", expr.span, f"{key} is one of {', '.join(allowed)}",
                           did_you_mean(getattr(v, "name", ""), allowed))
        return v.name

    def _iv_perturb(self, e: ast.Call, scope: Scope) -> Objective:
        """perturb(s, eps: 1e-5): LRC-BERT gradient perturbation of the student's embedding output."""
        self._arity(e, 1, "perturb")
        kw = self._kwargs(e, B.INTERVENTIONS["perturb"].options)
        s = self._role_model(e.args[0], ("student", "assistant"), "perturb's argument", scope)
        eps = self._num(kw["eps"], "eps", scope) if "eps" in kw else 1e-5
        if eps <= 0:
            raise self.err("bad-value", kw["eps"].span, "eps must be positive")
        norm = self._symbol_value(kw.get("norm"), "norm", B.PERTURB_NORMS, scope, "batch")
        iv = Intervention(kind="perturb", models=[s], span=e.span, params={
            "model": s, "on": "embeddings", "eps": eps, "direction": "gradient", "norm": "l2", "over": norm,
            "passes": 2, "first_pass_grads": "discarded", "grad_accumulation": False,
            "meaning": "pass 1 computes the stage loss and its gradient g w.r.t. the embedding output e; pass 2 "
                       "recomputes every term with e + eps * g / ||g|| (over: batch, the L2 norm of the whole "
                       "micro-batch's g; over: token, of each position's g, as GKD's F.normalize(g, dim=-1)); a "
                       "non-finite g perturbs nothing; only pass 2's gradients update the weights"})
        return Objective((), (iv,))

    def _iv_drop(self, e: ast.Call, scope: Scope) -> Objective:
        """drop(objective, p: 25%): DGKD; the terms are left out together with probability p each step."""
        self._arity(e, 1, "drop")
        obj = self._objective_arg(e.args[0], scope, "drop")
        kw = self._kwargs(e, B.INTERVENTIONS["drop"].options)
        p = self._fraction(kw["p"], "p", scope) if "p" in kw else 0.25
        if p >= 1:
            raise self.err("bad-value", kw["p"].span, "p below 100%: a unit dropped at every step never trains")
        if "per" in kw:  # per: teacher -- each teacher's terms form a drop unit of their own (DGKD)
            self._symbol_value(kw["per"], "per", ("teacher",), scope, "teacher")
            out = Objective()
            for part, _ in self._per_teacher(obj):
                one = self._drop_group(e, part, p)
                out = Objective(out.terms + one.terms, out.interventions + one.interventions)
            return out
        return self._drop_group(e, obj, p)

    def _drop_group(self, e: ast.Call, obj: Objective, p: float) -> Objective:
        group = self._new_group("drop")
        terms = self._grouped(e, obj.terms, Gate(group=group, every="step"))
        teachers = sorted({m for t in obj.terms for m in _node_models(t.target.node)})
        iv = Intervention(kind="drop", models=teachers, span=e.span, params={
            "group": group, "p": p, "every": "step", "min_kept": 1,
            "meaning": "each step the group's terms are left out together with probability p, independently of "
                       "other drop groups; if every drop group of the stage is dropped, one drawn at random is kept"})
        return Objective(terms, obj.interventions + (iv,))

    def _per_teacher(self, obj: Objective) -> list[tuple[Objective, str]]:
        """The terms of ``obj`` split by the teacher they read (first-appearance order), each with that teacher;
        teacher-free terms and terms reading two teachers are a type-mismatch."""
        groups: dict[str, list[Term]] = {}
        for t in obj.terms:
            models = _node_models(t.target.node)
            if len(models) != 1:
                raise self.err("type-mismatch", t.span, "split per teacher: each term must read exactly one teacher")
            groups.setdefault(models[0], []).append(t)
        return [(Objective(tuple(ts), obj.interventions if i == 0 else ()), teacher)
                for i, (teacher, ts) in enumerate(groups.items())]

    def _units(self, e: ast.Call, scope: Scope, fname: str) -> list[tuple[Objective, str]]:
        """The per-teacher units of weigh([...]) / select_teacher([...]): loss expressions reading one teacher each."""
        value = self.ev(e.args[0], scope)
        if isinstance(value, Objective):  # one expression over a list of teachers: one unit per teacher
            value = self._per_teacher(value)
            if len(value) < 2:
                raise self.err("type-mismatch", e.args[0].span, f"{fname}(x) needs x to read at least two teachers "
                               "(e.g. a loss over a list of teachers), or a list of loss expressions")
            return value
        if not isinstance(value, list) or len(value) < 2:
            raise self.err("type-mismatch", e.args[0].span, f"{fname}([...]) takes a list of at least two loss "
                           "expressions, one per teacher, or one loss expression over a list of teachers")
        units = []
        spans = e.args[0].items if isinstance(e.args[0], ast.List) else (e.args[0],) * len(value)
        for obj, expr in zip(value, spans):
            teachers = sorted({m for t in getattr(obj, "terms", ()) for m in _node_models(t.target.node)})
            if not isinstance(obj, Objective) or len(teachers) != 1:
                raise self.err("type-mismatch", expr.span, f"each unit of {fname}([...]) is a loss expression "
                               "reading exactly one teacher")
            units.append((obj, teachers[0]))
        if len({t for _, t in units}) != len(units):
            raise self.err("bad-value", e.args[0].span, f"two units of {fname}([...]) read the same teacher")
        return units

    def _unit_terms(self, e: ast.Call, units, prefix: str) -> tuple[str, tuple[Term, ...], list[dict]]:
        group = self._new_group(prefix)
        terms: list[Term] = []
        table = []
        for i, (obj, teacher) in enumerate(units):
            name = f"{group}/{i}"
            terms.extend(self._grouped(e, obj.terms, Gate(group=name)))
            table.append({"group": name, "teacher": teacher})
        return group, tuple(terms), table

    def _iv_weigh(self, e: ast.Call, scope: Scope) -> Objective:
        """weigh([unit, ...], by: teacher_ce | student_entropy, hard: false): per-teacher, per-example weights."""
        self._arity(e, 1, "weigh")
        kw = self._kwargs(e, B.INTERVENTIONS["weigh"].options)
        if "by" not in kw:
            raise self.err("missing-option", e.span, "weigh([...]) needs by: teacher_ce or by: student_entropy")
        by = self._symbol_value(kw["by"], "by", B.WEIGH_BY, scope, "")
        hard = self._bool(kw["hard"], "hard", scope) if "hard" in kw else False
        if hard and by != "student_entropy":
            raise self.err("conflicting-options", kw["hard"].span, "hard selection splits the batch by student "
                           "entropy: use by: student_entropy")
        units = self._units(e, scope, "weigh")
        group, terms, table = self._unit_terms(e, units, "weigh")
        params: dict[str, Any] = {"group": group, "by": by, "hard": hard, "units": table}
        if by == "teacher_ce":
            for _, teacher in units:  # the weight needs each teacher's own loss on the gold labels
                if self.models[teacher].head.kind != "classify":
                    raise self.err("no-task-head", e.span, f"weigh(by: teacher_ce) needs the CE of teacher "
                                   f"'{teacher}' on the labels, so a classification head",
                                   f"add `head: classify(<labels>)` to '{teacher}'")
            params.update(weight="1 / (1 + CE(labels, teacher task_logits)) per example", needs_labels=True)
        else:
            students = sorted({m for t in terms for m in _node_models(t.pred.node)})
            params.update(student=students[0] if students else None, min_micro_batch=len(units) if hard else 1,
                          entropy_of="task_logits" if students and self.models[students[0]].head.kind == "classify"
                          else "logits")
            params["weight"] = ("examples sorted by student entropy are split into len(units) equal slices; unit i "
                                "(teachers listed from smallest to largest) gets slice i" if hard else
                                "unit weights from the student's prediction entropy per example")
        iv = Intervention(kind="weigh", models=[t for _, t in units], span=e.span, params=params)
        interventions = tuple(i for obj, _ in units for i in obj.interventions)
        return Objective(terms, interventions + (iv,))

    def _iv_select_teacher(self, e: ast.Call, scope: Scope) -> Objective:
        """select_teacher([unit, ...], policy: reinforce, state: m, reward: ce, lr: x): RL-KD's agent."""
        self._arity(e, 1, "select_teacher")
        kw = self._kwargs(e, B.INTERVENTIONS["select_teacher"].options)
        policy = self._symbol_value(kw.get("policy"), "policy", B.POLICIES, scope, "reinforce")
        reward = self._symbol_value(kw.get("reward"), "reward", B.REWARDS, scope, "ce")
        state = self._role_model(kw["state"], ("teacher",), "state", scope) if "state" in kw else None
        lr = self._num(kw["lr"], "lr", scope) if "lr" in kw else None
        if lr is not None and lr <= 0:
            raise self.err("bad-value", kw["lr"].span, "lr must be positive")
        units = self._units(e, scope, "select_teacher")
        if state is not None and state in {t for _, t in units}:
            raise self.err("bad-value", kw["state"].span, f"the state model '{state}' only encodes inputs for the "
                           "agent; it cannot also be a selectable teacher")
        group, terms, table = self._unit_terms(e, units, "select")
        models = [t for _, t in units] + ([state] if state else [])
        iv = Intervention(kind="select_teacher", models=models, span=e.span, params={
            "group": group, "policy": policy, "units": table, "state_model": state,
            "state": ["[CLS] state of state_model" if state else "student [CLS] state", "each teacher's soft labels"],
            "action": "keep or skip each unit per example (Bernoulli per teacher)", "reward": reward,
            "reward_meaning": "-CE(labels, student)" if reward == "ce" else "-(CE + KL to the kept teachers)",
            "baseline": "running mean of the reward", "lr": lr, "agent": "two-layer MLP owned by the student wrapper"})
        interventions = tuple(i for obj, _ in units for i in obj.interventions)
        return Objective(terms, interventions + (iv,))

    # ------------------------------------------------------------ transforms

    def _items(self, expr: ast.Expr, scope: Scope, what: str) -> ItemSet:
        return self._items_of(self.ev(expr, scope), expr, what)

    def _items_of(self, v: Any, expr: ast.Expr, what: str) -> ItemSet:
        if isinstance(v, Symbol):
            raise self._unknown_value(v)
        if isinstance(v, list) and v and all(isinstance(x, ItemSet) for x in v):
            return ItemSet(tuple(i for s in v for i in s.items), layered=all(s.layered for s in v), span=expr.span)
        if not isinstance(v, ItemSet):
            raise self.err("type-mismatch", expr.span, f"{what} needs a signal, got {_kind(v)}")
        return v

    def _transform(self, e: ast.Call, name: str, scope: Scope) -> ItemSet | PerModel:
        if not e.args:
            raise self.err("bad-arity", e.span, f"{name}(...) needs a signal")
        kw = self._kwargs(e, B.TRANSFORMS[name])
        value = self.ev(e.args[0], scope)
        if isinstance(value, PerModel) and name not in ("mean", "concat"):  # one transform (and module) per model
            return PerModel(getattr(self, "_t_" + name)(e, self._items_of(v, e.args[0], name), kw, scope)
                            for v in value)
        xs = self._items_of(value, e.args[0], name)
        return getattr(self, "_t_" + name)(e, xs, kw, scope)

    def _t_project(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        self._arity(e, 1, "project")
        out = None
        if "to" in kw:
            out = self.models[self._model_arg(kw["to"], scope, "to")].arch.hidden_size
        if "dim" in kw:
            out = self._int(kw["dim"], "dim", minimum=1, scope=scope)
        shared = self._bool(kw["shared"], "shared") if "shared" in kw else True
        self._module_ids += 1
        key = f"project{self._module_ids}"
        items = []
        for it in xs.items:
            if it.feat.kind not in ("hidden", "qkv", "pooled") or it.feat.dim is None:
                raise self.err("type-mismatch", e.args[0].span, f"project() maps hidden-state-like signals, not "
                               f"{it.feat.kind}")
            module = key if shared else f"{key}.{it.layer}"
            node = OpNode(op="project", inputs=[it.node], params={"in": it.feat.dim, "out": out}, module=module)
            items.append(replace(it, node=node, feat=replace(it.feat, dim=out)))
        return replace(xs, items=tuple(items))

    def _t_relation(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        self._arity(e, 1, "relation")
        items = []
        for it in xs.items:
            if it.feat.kind not in ("hidden", "qkv") or it.feat.dim is None:
                raise self.err("type-mismatch", e.args[0].span, f"relation() takes hidden states or query/key/value, "
                               f"not {it.feat.kind}")
            heads = self._int(kw["heads"], "heads", minimum=1, scope=scope) if "heads" in kw else None
            heads = heads or self._default_heads(it)
            if it.feat.dim % heads:
                raise self.err("relation-heads", (kw.get("heads") or e).span,
                               f"{heads} relation heads do not divide width {it.feat.dim} of {_describe(it)}")
            softmax = self._bool(kw["softmax"], "softmax", scope) if "softmax" in kw else True
            params = {"heads": heads} if softmax else {"heads": heads, "softmax": False}
            node = OpNode(op="relation", inputs=[it.node], params=params)
            items.append(replace(it, node=node, feat=Feat("relation", heads=heads, probs=softmax)))
        return replace(xs, items=tuple(items))

    def _default_heads(self, it: Item) -> int:
        a = self.models[it.model].arch
        return a.num_heads if it.feat.dim % a.num_heads == 0 else 1

    def _t_pool(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        how = "mean"
        if len(e.args) > 1:
            how_v = self.ev(e.args[1], scope)
            how = how_v.name if isinstance(how_v, Symbol) else None
        elif "how" in kw:
            how_v = self.ev(kw["how"], scope)
            how = how_v.name if isinstance(how_v, Symbol) else None
        if how not in B.POOLS:
            raise self.err("bad-value", e.span, "pool(x, mean|cls|max)")
        items = []
        for it in xs.items:
            if it.feat.kind not in ("hidden", "qkv"):
                raise self.err("type-mismatch", e.args[0].span, f"pool() takes hidden states, not {it.feat.kind}")
            node = OpNode(op="pool", inputs=[it.node], params={"how": how})
            items.append(replace(it, node=node, feat=Feat("pooled", dim=it.feat.dim)))
        return replace(xs, items=tuple(items))

    def _t_normalize(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        self._arity(e, 1, "normalize")
        items = tuple(replace(it, node=OpNode(op="normalize", inputs=[it.node])) for it in xs.items)
        return replace(xs, items=items)

    def _t_select(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        self._arity(e, 1, "select")
        if "vocab" not in kw or not isinstance(kw["vocab"], ast.Name) or kw["vocab"].id not in self.vocabs:
            raise self.err("type-mismatch", e.span, "select(logits, vocab: <name of a vocab block>)",
                           did_you_mean(getattr(kw.get("vocab"), "id", ""), self.vocabs))
        name = kw["vocab"].id
        items = []
        for it in xs.items:
            if it.feat.kind != "logits":
                raise self.err("type-mismatch", e.args[0].span, "select() takes logits")
            items.append(replace(it, node=OpNode(op="select_vocab", inputs=[it.node], params={"vocab": name}),
                                 feat=replace(it.feat, vocab=f"vocab:{name}")))
        return replace(xs, items=tuple(items))

    def _t_attend(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        """attend(<teacher layers>, <student query>): per student item, ALP-KD's attention over teacher layers."""
        self._arity(e, 2, "attend")
        query = self._items(e.args[1], scope, "attend")
        for it in (*xs.items, *query.items):
            if it.feat.kind not in ("hidden", "qkv", "pooled"):
                raise self.err("type-mismatch", e.span, f"attend() takes hidden states, not {it.feat.kind}")
        t_dim = xs.items[0].feat.dim
        if t_dim is not None:  # an open projection of the query takes the teacher's width
            query = replace(query, items=tuple(self._fill_projection(q, t_dim) if q.feat.dim is None else q
                                               for q in query.items))
        q_dim = query.items[0].feat.dim
        if t_dim != q_dim:
            raise self.err("dim-mismatch", e.span, f"attend() needs equal widths: {t_dim} (teacher layers) vs "
                           f"{q_dim} (query)", "project the query: attend(t.hidden, project(s.hidden))")
        first = xs.items[0]
        items = tuple(Item(OpNode(op="attend", inputs=[q.node, *(t.node for t in xs.items)]), first.feat,
                           first.model, q.layer, e.span) for q in query.items)
        return ItemSet(items, layered=query.layered, span=e.span)

    def _t_anneal(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        """anneal(x, phi: linear(0, 1)): Annealing-KD's target ``phi * x``, phi following a schedule."""
        self._arity(e, 1, "anneal")
        if "phi" not in kw:
            raise self.err("missing-option", e.span, "anneal() needs 'phi', e.g. anneal(x, phi: linear(0.1, 1))")
        phi = self._option(kw["phi"], "phi", "schedule", scope)
        items = tuple(replace(it, node=OpNode(op="anneal", inputs=[it.node], params={"phi": phi}))
                      for it in xs.items)
        return replace(xs, items=items)

    def _t_concat(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        return self._reduce_layers(e, xs, "concat")

    def _t_mean(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        return self._reduce_layers(e, xs, "mean")

    def _reduce_layers(self, e, xs: ItemSet, op: str) -> ItemSet:
        self._arity(e, 1, op)
        feats = {(it.feat.kind, it.feat.dim) for it in xs.items}
        if len(feats) != 1:
            raise self.err("shape-mismatch", e.span, f"{op}() needs signals of one kind and width")
        kind, dim = feats.pop()
        out_dim = dim * len(xs.items) if op == "concat" and dim else dim
        node = OpNode(op=op, inputs=[it.node for it in xs.items])
        first = xs.items[0]
        return ItemSet((Item(node, replace(first.feat, dim=out_dim), first.model, None, e.span),), span=e.span)

    def _t_align(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        """align(t.hidden, s.hidden, map: uniform): the teacher items a layer map pairs with each student item."""
        self._arity(e, 2, "align")
        ys = self._items(e.args[1], scope, "align")
        if "map" not in kw:
            raise self.err("missing-option", e.span, "align() needs map: uniform, skip, last, first or pairs(...)")
        lmap = self.ev(kw["map"], scope)
        if not isinstance(lmap, LayerMap):
            raise self.err("bad-layer-map", kw["map"].span, "map is uniform, skip, last, first or pairs(...)")
        items = tuple(replace(t, layer=p.layer) for t, p in self._pair(e, xs, ys, lmap))
        return ItemSet(items, layered=True, span=e.span)

    def _t_stack(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        """stack(x): items stacked on a new axis [b, s, n, h]; relation losses then relate the n items (CKD)."""
        self._arity(e, 1, "stack")
        feats = {(it.feat.kind, it.feat.dim) for it in xs.items}
        if len(feats) != 1 or xs.items[0].feat.kind not in ("hidden", "qkv"):
            raise self.err("shape-mismatch", e.span, "stack() needs hidden states of one width")
        first = xs.items[0]
        node = OpNode(op="stack", inputs=[it.node for it in xs.items], params={"axis": -2})
        feat = replace(first.feat, items=len(xs.items))
        return ItemSet((Item(node, feat, first.model, None, e.span),), span=e.span)

    def _t_spans(self, e, xs: ItemSet, kw, scope) -> ItemSet:
        """spans(x, max: 40%): mean-pooled random contiguous spans of positions (MGSKD's span level)."""
        self._arity(e, 1, "spans")
        longest = self._fraction(kw["max"], "max", scope) if "max" in kw else 0.4
        if longest <= 0:
            raise self.err("bad-value", kw["max"].span, "max must be above 0%")
        items = []
        for it in xs.items:
            if it.feat.kind not in ("hidden", "qkv"):
                raise self.err("type-mismatch", e.args[0].span, f"spans() takes hidden states, not {it.feat.kind}")
            node = OpNode(op="spans", inputs=[it.node], params={
                "max_fraction": longest, "pool": "mean", "segmentation": "drawn once per step, shared by every "
                "spans() op of the stage"})
            items.append(replace(it, node=node))
        return replace(xs, items=tuple(items))

    def _check_relation_pair(self, e: ast.Call, fn: str, t: Item, p: Item, rel, heads: int | None) -> tuple[Item, Item]:
        """distance/angle relate items within each model: widths may differ, the related axis may not."""
        if t.feat.items != p.feat.items:
            raise self.err("layer-count-mismatch", e.span, f"{fn} relates {t.feat.items or 'positions'} items of the "
                           f"target with {p.feat.items or 'positions'} of the prediction",
                           "stack as many items on both sides, e.g. stack(align(t.hidden, s.hidden, map: uniform))",
                           related=rel)
        if heads is not None:
            span = next(k.span for k in e.kwargs if k.key.name == "heads")
            for it in (t, p):
                if it.feat.dim is not None and it.feat.dim % heads:
                    raise self.err("relation-heads", span, f"{heads} relation heads do not divide width "
                                   f"{it.feat.dim} of {_describe(it)}", related=rel)
        return t, p

    # ------------------------------------------------------------ losses

    def _loss(self, e: ast.Call, fn: str, scope: Scope) -> Objective:
        if len(e.args) != 2:
            raise self.err("bad-arity", e.span, f"{fn}(target, prediction) takes two signals, got {len(e.args)}")
        target_value = self.ev(e.args[0], scope)
        targets = list(target_value) if isinstance(target_value, PerModel) else [target_value]
        pred_value = self.ev(e.args[1], scope)
        if isinstance(pred_value, PerModel):
            raise self.err("type-mismatch", e.args[1].span, f"the prediction of {fn} is one student's signal, not a "
                           "list of models' (a list of teachers goes in the first argument)")
        pred = self._items_of(pred_value, e.args[1], fn)
        spec_opts = dict(B.LOSSES[fn].options, map="map")
        kw = self._kwargs(e, spec_opts)
        options: dict[str, Any] = {}
        for key, kind in B.LOSSES[fn].options.items():
            if key in kw:
                options[key] = self._option(kw[key], key, kind, scope)
        if "T" in options:
            t = options["T"]
            if min(t.value, t.end if t.end is not None else t.value) <= 0:
                raise self.err("bad-temperature", kw["T"].span, f"temperature must be positive, got {_fmt(t.value)}")
        layer_map = None
        if "map" in kw:
            layer_map = self.ev(kw["map"], scope)
            if isinstance(layer_map, Symbol) or not isinstance(layer_map, LayerMap):
                raise self.err("bad-layer-map", kw["map"].span, "map is uniform, skip, last, first or pairs(...)",
                               did_you_mean(getattr(layer_map, "name", ""), B.LAYER_MAPS))
        terms: list[Term] = []
        for value in targets:  # a list of teachers: the terms of each, in list order
            pairs = self._pair(e, self._items_of(value, e.args[0], fn), pred, layer_map)
            terms.extend(self._term(e, fn, t, p, options, scope.method) for t, p in pairs)
        return Objective(tuple(terms))

    def _pair(self, e: ast.Call, target: ItemSet, pred: ItemSet, lmap: LayerMap | None) -> list[tuple[Item, Item]]:
        if lmap is None:
            if len(target.items) != len(pred.items):
                hint = "add map: uniform (or skip, last, pairs(...))" if target.layered and pred.layered else None
                raise self.err("layer-count-mismatch", e.span, f"{len(target.items)} target layers vs "
                               f"{len(pred.items)} prediction layers", hint)
            return list(zip(target.items, pred.items))
        if not (target.layered and pred.layered):
            raise self.err("bad-layer-map", lmap.span, "a layer map pairs layered signals (hidden, attn_*, ...)")
        t_model, s_model = target.items[0].model, pred.items[0].model
        lt, ls = self.models[t_model].arch.num_layers, self.models[s_model].arch.num_layers
        by_layer = {it.layer: it for it in target.items}
        out = []
        for p in pred.items:
            j = self._map_layer(lmap, p.layer, ls, lt, e)
            if j is None:
                continue
            if j not in by_layer:
                raise self.err("bad-layer-map", lmap.span, f"map sends student layer {p.layer} to teacher layer {j}, "
                               "which the target signal does not include")
            out.append((by_layer[j], p))
        if not out:
            raise self.err("bad-layer-map", lmap.span, "the layer map pairs no layers")
        return out

    def _map_layer(self, lmap: LayerMap, j: int, ls: int, lt: int, e: ast.Call) -> int | None:
        if lmap.kind in ("uniform", "skip", "last") and lt < ls:
            raise self.err("bad-layer-map", lmap.span, f"map {lmap.kind} needs a teacher at least as deep as the "
                           f"student ({lt} < {ls} layers)")
        if lmap.kind == "uniform" or lmap.kind == "skip":
            if lt % ls:
                raise self.err("bad-layer-map", lmap.span, f"map {lmap.kind} needs teacher layers ({lt}) to be a "
                               f"multiple of student layers ({ls})", "use pairs(...) for an explicit map")
            if lmap.kind == "skip" and j == ls - 1:
                return None
            return (j + 1) * (lt // ls) - 1
        if lmap.kind == "last":
            return lt - ls + j
        if lmap.kind == "first":
            if j >= lt:
                raise self.err("bad-layer-map", lmap.span, f"map first: teacher has only {lt} layers")
            return j
        table = dict(lmap.pairs)
        for s, t in lmap.pairs:
            if not (0 <= s < ls and 0 <= t < lt):
                raise self.err("layer-out-of-range", lmap.span, f"pair ({s}, {t}) is outside student 0..{ls - 1} / "
                               f"teacher 0..{lt - 1}")
        return table.get(j)

    def _term(self, e: ast.Call, fn: str, t: Item, p: Item, options: dict, method: str | None = None) -> Term:
        loss = B.LOSSES[fn]
        p_model = self.models.get(p.model) if p.model else None
        if p_model is None or p_model.role == "teacher":
            t_model = self.models.get(t.model) if t.model else None
            if t_model is not None and t_model.role != "teacher":
                raise self.err("no-gradient", e.args[1].span, f"the prediction (second argument) of {fn} must be a "
                               f"student signal; swap the arguments: {fn}(teacher, student)")
            raise self.err("no-gradient", e.span, f"{fn} compares no student signal, so it trains nothing")
        t, p = self._check_pair(e, fn, t, p, method, options)
        kind = _group(t.feat.kind)
        if kind not in {_group(k) for k in loss.accepts}:
            raise self.err("type-mismatch", e.span, f"{fn} does not compare {t.feat.kind} signals",
                           f"{fn} takes: {', '.join(sorted(loss.accepts))}")
        options = dict(options)
        if fn in B.DISTRIBUTION_LOSSES and t.feat.probs:
            options["inputs"] = "probs"
        if fn in B.DISTRIBUTION_LOSSES and t.feat.kind == "attn" and not t.feat.probs:
            options["inputs"] = "logits"
        return Term(fn=fn, target=t, pred=p, options=options, span=e.span)

    def _check_pair(self, e: ast.Call, fn: str, t: Item, p: Item, method: str | None = None,
                    options: dict | None = None) -> tuple[Item, Item]:
        rel = [(e.args[0].span, f"target: {_describe(t)}"), (e.args[1].span, f"prediction: {_describe(p)}")]
        strict = B.STRICT_METHODS.get((method or "").split(".")[0])
        tk, pk = t.feat.kind, p.feat.kind
        if fn == "ce":
            ok = (tk, pk) in (("labels", "task_logits"), ("tokens", "logits"))
            if not ok:
                raise self.err("shape-mismatch", e.span, f"ce compares labels with task_logits or tokens with logits, "
                               f"not {tk} with {pk}", related=rel)
            return t, p
        if _group(tk) != _group(pk):
            raise self.err("shape-mismatch", e.span, f"{fn} compares {tk} with {pk}", related=rel)
        if tk == "attn" or tk == "relation":
            if t.feat.heads != p.feat.heads:
                what = "attention" if tk == "attn" else "relation"
                if strict:
                    raise self.err(strict[0], e.span, f"{what} heads differ: {t.feat.heads} (teacher) vs "
                                   f"{p.feat.heads} (student) in {method}", strict[1], related=rel)
                raise self.err("head-mismatch", e.span, f"{what} heads differ: {t.feat.heads} (target) vs "
                               f"{p.feat.heads} (prediction)", "compare relations with equal heads instead: "
                               "relation(x.query[i], heads: N) on both sides (MiniLMv2)", related=rel)
            return t, p
        if tk == "logits":
            if t.feat.vocab != p.feat.vocab:
                t = self._auto_select(t, p, e, rel)
            return t, p
        if tk == "task_logits":
            if t.feat.classes != p.feat.classes:
                raise self.err("shape-mismatch", e.span, f"task heads differ: {t.feat.classes} vs {p.feat.classes} "
                               "labels", related=rel)
            return t, p
        if fn in B.RELATION_LOSSES:
            return self._check_relation_pair(e, fn, t, p, rel, (options or {}).get("heads"))
        if p.feat.dim is None and t.feat.dim is not None:
            p = self._fill_projection(p, t.feat.dim)
        if t.feat.dim is None and p.feat.dim is not None:
            t = self._fill_projection(t, p.feat.dim)
        if t.feat.dim != p.feat.dim and strict:
            raise self.err(strict[0], e.span, f"widths differ: {t.feat.dim} (teacher) vs {p.feat.dim} (student) "
                           f"in {method}", strict[1], related=rel)
        if t.feat.dim != p.feat.dim and fn == "cos":
            raise self.err("cosine-width", e.span, f"cosine between vectors of different widths: {t.feat.dim} "
                           f"(target) vs {p.feat.dim} (prediction)", "DistilBERT's cosine loss needs the teacher's "
                           "hidden size in the student (it starts from the teacher's layers); otherwise compare "
                           f"cos(..., project({_describe(p)})) explicitly", related=rel)
        if t.feat.dim != p.feat.dim:
            raise self.err("dim-mismatch", e.span, f"widths differ: {t.feat.dim} (target) vs {p.feat.dim} "
                           f"(prediction)", f"project the student side: {fn}(..., project({_describe(p)}))",
                           related=rel)
        return t, p

    def _auto_select(self, t: Item, p: Item, e: ast.Call, rel) -> Item:
        """Teacher logits over the full vocabulary vs a compressed student: reduce to the kept columns (GLMD)."""
        vocab = p.feat.vocab or ""
        if vocab.startswith("vocab:"):
            spec = self.vocabs[vocab[len("vocab:"):]]
            if self._vocab_space(spec.source) == t.feat.vocab:
                node = OpNode(op="select_vocab", inputs=[t.node], params={"vocab": spec.name})
                return replace(t, node=node, feat=replace(t.feat, vocab=vocab))
        raise self.err("vocab-mismatch", e.span, f"logits over different vocabularies ({_vocab_label(t.feat.vocab)} "
                       f"vs {_vocab_label(p.feat.vocab)})", "distill between models sharing a tokenizer, or declare "
                       "a vocab block mapping the student's vocabulary", related=rel)

    def _fill_projection(self, it: Item, dim: int) -> Item:
        node = it.node
        if isinstance(node, OpNode) and node.op == "project" and node.params.get("out") is None:
            node = node.model_copy(update={"params": {**node.params, "out": dim}})
        return replace(it, node=node, feat=replace(it.feat, dim=dim))

    # ------------------------------------------------------------ small value readers

    def _block(self, block: ast.Block | None, keys: dict[str, str], what: str) -> dict[str, ast.Expr]:
        out: dict[str, ast.Expr] = {}
        if block is None:
            return out
        for entry in block.entries:
            k = entry.key.name
            if k not in keys:
                self.err("unknown-option", entry.key.span, f"unknown {what} option '{k}'",
                         did_you_mean(k, keys) or f"{what} options: {', '.join(keys)}")
            elif k in out:
                self.err("duplicate-option", entry.key.span, f"'{k}' is given twice")
            else:
                out[k] = entry.value
        return out

    def _kwargs(self, e: ast.Call, keys: dict[str, str]) -> dict[str, ast.Expr]:
        out: dict[str, ast.Expr] = {}
        fname = e.func.id if isinstance(e.func, ast.Name) else "call"
        for kw in e.kwargs:
            k = kw.key.name
            if k not in keys:
                raise self.err("unknown-option", kw.key.span, f"{fname}() has no option '{k}'",
                               did_you_mean(k, keys) or (f"options: {', '.join(keys)}" if keys else "it takes none"))
            if k in out:
                raise self.err("duplicate-option", kw.key.span, f"'{k}' is given twice")
            out[k] = kw.value
        return out

    def _arity(self, e: ast.Call, n: int, name: str) -> None:
        if len(e.args) != n:
            raise self.err("bad-arity", e.span, f"{name}() takes {n} positional argument{'s' if n != 1 else ''}, "
                           f"got {len(e.args)}")

    def _option(self, expr: ast.Expr, key: str, kind: str, scope: Scope) -> Any:
        if kind == "schedule":
            v = self.ev(expr, scope)
            if isinstance(v, NumVal) and v.unit is None:
                return Schedule(value=v.value)
            if isinstance(v, Schedule):
                return v
            raise self.err("type-mismatch", expr.span, f"{key} is a number or a schedule like linear(20, 1)")
        if kind == "bool":
            return self._bool(expr, key, scope)
        if kind == "int":
            return self._int(expr, key, minimum=1, scope=scope)
        value = self._num(expr, key, scope)
        if value < 0:
            raise self.err("bad-value", expr.span, f"{key} must not be negative")
        return value

    def _plain_number(self, expr: ast.Expr, scope: Scope) -> float:
        v = self.ev(expr, scope)
        if isinstance(v, Symbol):
            raise self._unknown_value(v)
        if not isinstance(v, NumVal) or v.unit == "bytes":
            raise self.err("type-mismatch", expr.span, f"expected a number, got {_kind(v)}")
        return v.value

    def _num(self, expr: ast.Expr, key: str, scope: Scope | None = None) -> float:
        v = self.ev(expr, scope or Scope(self.lets))
        if isinstance(v, Symbol):
            raise self._unknown_value(v)
        if not isinstance(v, NumVal):
            raise self.err("type-mismatch", expr.span, f"{key} must be a number, got {_kind(v)}")
        if v.unit is not None:
            raise self.err("bad-number", expr.span, f"{key} takes a plain number, not {v.unit}")
        return v.value

    def _int(self, expr: ast.Expr, key: str, minimum: int | None = None, scope: Scope | None = None) -> int:
        v = self._num(expr, key, scope)
        if v != int(v):
            raise self.err("bad-number", expr.span, f"{key} must be a whole number, got {_fmt(v)}")
        if minimum is not None and v < minimum:
            raise self.err("bad-value", expr.span, f"{key} must be at least {minimum}, got {_fmt(v)}")
        return int(v)

    def _fraction(self, expr: ast.Expr, key: str, scope: Scope | None = None) -> float:
        v = self.ev(expr, scope or Scope(self.lets))
        if not isinstance(v, NumVal) or v.unit == "bytes":
            raise self.err("type-mismatch", expr.span, f"{key} is a fraction like 5% or 0.05")
        if not 0 <= v.value <= 1:
            raise self.err("bad-value", expr.span, f"{key} must lie between 0% and 100%")
        return v.value

    def _bytes(self, expr: ast.Expr, key: str) -> int:
        v = self.ev(expr, Scope(self.lets))
        if not isinstance(v, NumVal) or v.unit != "bytes":
            raise self.err("bad-number", expr.span, f"{key} is a size like 512GB or 64GiB")
        return int(v.value)

    def _bool(self, expr: ast.Expr, key: str, scope: Scope | None = None) -> bool:
        v = self.ev(expr, scope or Scope(self.lets))
        if not isinstance(v, bool):
            raise self.err("type-mismatch", expr.span, f"{key} is true or false")
        return v

    def _string(self, expr: ast.Expr, key: str) -> str:
        v = self.ev(expr, Scope(self.lets))
        if not isinstance(v, str):
            raise self.err("type-mismatch", expr.span, f"{key} takes a string in double quotes")
        return v

    def _strings(self, expr: ast.Expr, key: str) -> list[str]:
        v = self.ev(expr, Scope(self.lets))
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise self.err("type-mismatch", expr.span, f'{key} is a list of strings: ["yes", "no"]')
        return v

    def _symbol(self, expr: ast.Expr, key: str, allowed) -> str:
        if isinstance(expr, ast.Name) and expr.id in allowed:
            return expr.id
        got = expr.id if isinstance(expr, ast.Name) else "that"
        raise self.err("bad-value", expr.span, f"{key} is one of {', '.join(allowed)}", did_you_mean(got, allowed))

    def _column(self, expr: ast.Expr, key: str) -> str:
        if isinstance(expr, ast.Name):
            return expr.id
        if isinstance(expr, ast.String):
            return expr.value
        raise self.err("type-mismatch", expr.span, f"{key} names a column")

    def _layer_list(self, expr: ast.Expr, n: int, call: ast.Call) -> list[int]:
        if not isinstance(expr, ast.List):
            raise self.err("type-mismatch", expr.span, "layers is a list: [0, 2, 4]")
        out = []
        for item in expr.items:
            i = self._index_int(item, Scope(self.lets))
            if not -n <= i < n:
                raise self._out_of_range(item.span, i, n, None)
            out.append(i % n)
        return out

    def _model_name(self, expr: ast.Expr) -> str:
        if isinstance(expr, ast.Name) and expr.id in self.models:
            self.used.add(expr.id)
            return expr.id
        if isinstance(expr, ast.Name) and expr.id in self.model_decls:
            raise _Skip()
        name = expr.id if isinstance(expr, ast.Name) else "?"
        raise self._unknown("unknown-model", expr.span, name, self.models)

    def _data_name(self, expr: ast.Expr) -> str:
        if isinstance(expr, ast.Name) and expr.id in self.data:
            self.used.add(expr.id)
            return expr.id
        if isinstance(expr, ast.Name) and expr.id in self.data_decls:
            self.used.add(expr.id)
            raise _Skip()
        name = expr.id if isinstance(expr, ast.Name) else "?"
        raise self._unknown("unknown-data", expr.span, name, self.data)

    def _unknown(self, code: str, span: Span, name: str, known) -> _Skip:
        what = {"unknown-model": "model", "unknown-data": "data source", "unknown-stage": "stage"}[code]
        return self.err(code, span, f"unknown {what} '{name}'", did_you_mean(name, known))

    def _unknown_value(self, sym: Symbol) -> _Skip:
        known = [*self.models, *self.data, *self.lets, *B.TARGETS, *B.LAYER_MAPS]
        return self.err("unknown-name", sym.span, f"unknown name '{sym.name}'", did_you_mean(sym.name, known))


# ---------------------------------------------------------------- helpers


def _stdlib_methods() -> dict[str, list[str]]:
    """method name -> libraries defining it, by a scan of the stdlib texts (only used for error hints)."""
    out: dict[str, list[str]] = {}
    for file in sorted(STDLIB.glob("*.gkd")):
        for m in re.finditer(r"^method\s+([A-Za-z_]\w*)", file.read_text(encoding="utf-8"), re.M):
            out.setdefault(m.group(1), []).append(file.stem)
    return out


def _stdlib_hint(name: str, used: dict) -> str | None:
    """For a method that a library not yet ``use``d defines: which ``use`` line brings it in."""
    methods = _stdlib_methods()
    close = difflib.get_close_matches(name, list(methods), n=1, cutoff=0.6)
    if not close:
        return None
    lib = methods[close[0]][0]
    call = close[0] if close[0] == lib else f"{lib}.{close[0]}"
    if lib in used:
        return f"did you mean '{call}'?"
    return f"did you mean '{call}'? add `use {lib}` to load it from the standard library"


def _node_models(node) -> list[str]:
    """Models whose signals a node tree reads, in first-use order."""
    if isinstance(node, SignalNode):
        return [node.model] if node.model else []
    out: list[str] = []
    for child in node.inputs:
        out.extend(m for m in _node_models(child) if m not in out)
    return out


def _group(kind: str) -> str:
    return "vector" if kind in _VECTOR_KINDS else kind


def _describe(it: Item) -> str:
    node = it.node
    ops = []
    while isinstance(node, OpNode):
        ops.append(node.op)
        node = node.inputs[0]
    layer = f"[{node.layer}]" if node.layer is not None else ""
    base = f"{node.model}.{node.kind}{layer}" if node.model else node.kind
    for op in ops:
        base = f"{op}({base})"
    return base


def _kind(v: Any) -> str:
    return {ModelRef: "a model", DataRef: "a data source", Objective: "a loss expression", ItemSet: "a signal",
            NumVal: "a number", Schedule: "a schedule", str: "a string", bool: "a boolean", LayerMap: "a layer map",
            list: "a list", tuple: "a tuple", MethodDef: "a method", Trigger: "a trigger",
            PerModel: "a signal of each model of a list"}.get(type(v), type(v).__name__)


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _vocab_label(space: str | None) -> str:
    if space is None:
        return "?"
    if space.startswith("vocab:"):
        return f"compressed vocabulary '{space[6:]}'"
    parts = space.split(":")
    return f"{parts[0]} vocabulary of {parts[1]} tokens"
