"""Spec -> SignalGraph: the data dependencies of every stage's losses, pruning, liveness and DOT export.

Nodes (ids are readable strings, attribute ``type`` says which kind):

- ``signal``  ``sig:<model>.<kind>[<layer>]``: one per model signal, with a symbolic ``shape`` such as
  ``("b", "s", 768)``, ``dtype``, ``dtype_bytes`` and ``bytes_per_token`` (None for attention maps, whose size
  per token grows with the sequence, and for per-sequence task logits). Every model used by a loss gets its
  whole block chain ``embeddings -> hidden[0] -> ... -> hidden[L-1] -> logits`` (edges of ``kind="chain"``);
  a block's other signals (attention, Q/K/V, FFN) hang off the block's input.
- ``data``    ``data:labels`` / ``data:tokens``: targets read from the batch (no model runs for them).
- ``op``      ``op:<name>:<digest>``: a transform; identical subtrees are one node. ``module`` names the
  learned parameters it owns (projections), ``None`` for stateless ops.
- ``term``    ``term:<stage>:<id>``: a loss term; edges from its target and prediction (``role``).
- ``stage``   ``stage:<name>``: edges from each of its terms.

Identical signals read by several terms, methods or stages are one node, so the runtime captures them once.
Per stage the graph answers: which points each model must capture and how deep it must run (``captures``),
which teachers it never reads (``unused_teachers``), after which term each signal may be freed
(``last_use``) and how many bytes the captured signals hold (``signal_bytes``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gkdlang.builtins import DTYPE_BYTES as BYTES_PER_ELEMENT
from gkdlang.spec import LAYERED_KINDS, LossTerm, ModelSpec, Node, OpNode, Project, SignalNode, Spec, StageSpec
from planner.digraph import DiGraph, ancestors, descendants
from planner.plan import CapturePoint, ModelCapture

DTYPE_BYTES = {**BYTES_PER_ELEMENT, "int64": 8}
HEAD_KINDS = frozenset({"logits", "task_logits"})
DATA_KINDS = frozenset({"labels", "tokens"})
ATTENTION_KINDS = frozenset({"attn_scores", "attn_probs"})
#: losses whose runtime kernels are row-chunked (runtime/chunked.py) and accept a fused head
CHUNKED_LOSSES = frozenset({"kl", "soft_ce", "jsd", "gjsd", "skew_kl", "skew_rkl", "ce"})
#: families whose LM head is one linear layer applied to the base model's output (after its final norm)
FUSABLE_FAMILIES = frozenset({"gpt2", "llama", "qwen2", "mistral"})
#: order of capture points inside one block (and of the whole model), for deterministic output
KIND_ORDER = ("embeddings", "query", "key", "value", "attn_scores", "attn_probs", "ffn", "hidden",
              "logits", "task_logits", "labels", "tokens")

Shape = tuple[str | int, ...]


class GraphRenderError(ValueError):
    """The graph could not be written in the requested format (message says why and what to do)."""


@dataclass(frozen=True)
class SignalKey:
    """One signal: ``model`` is None for data targets (labels, tokens)."""

    model: str | None
    kind: str
    layer: int | None = None

    def __str__(self) -> str:
        name = self.kind if self.layer is None else f"{self.kind}[{self.layer}]"
        return name if self.model is None else f"{self.model}.{name}"

    @property
    def node_id(self) -> str:
        return f"data:{self.kind}" if self.model is None else f"sig:{self}"

    @property
    def sort_key(self) -> tuple:
        # embeddings before block 0, block signals by layer, head last
        depth = -1 if self.kind == "embeddings" else (10**9 if self.layer is None else self.layer)
        return (self.model or "", depth, KIND_ORDER.index(self.kind))


# ---------------------------------------------------------------- shapes


def signal_shape(model: ModelSpec, kind: str) -> Shape:
    """Symbolic shape of a model signal; ``"b"`` and ``"s"`` are batch and sequence length."""
    a = model.arch
    widths = {"embeddings": a.hidden_size, "hidden": a.hidden_size, "query": a.num_heads * a.head_dim,
              "key": a.kv_dim, "value": a.kv_dim, "ffn": a.intermediate_size, "logits": a.vocab_size}
    if kind in ATTENTION_KINDS:
        return ("b", a.num_heads, "s", "s")
    if kind == "task_logits":
        # an unset label count is the binary default of HF sequence classification
        return ("b", model.head.num_labels or 2)
    return ("b", "s", widths[kind])


def numel(shape: Shape, batch: int, seq_len: int) -> int:
    n = 1
    for dim in shape:
        n *= batch if dim == "b" else seq_len if dim == "s" else int(dim)
    return n


def _bytes_per_token(shape: Shape, dtype_bytes: int) -> int | None:
    if shape.count("s") != 1:
        return None
    return numel(shape, 1, 1) * dtype_bytes


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class SignalGraph:
    """The signal graph of one Spec (see the module docstring); queries take a stage name or StageSpec."""

    spec: Spec
    graph: DiGraph

    # ------------------------------------------------------------ stage queries

    def stage(self, stage: str | StageSpec) -> StageSpec:
        if isinstance(stage, StageSpec):
            return stage
        for s in self.spec.stages:
            if s.name == stage:
                return s
        raise KeyError(f"no stage named '{stage}' (stages: {', '.join(s.name for s in self.spec.stages)})")

    def captured_signals(self, stage: str | StageSpec) -> list[SignalKey]:
        """Model signals a stage's ops and terms read directly (what the hooks must capture)."""
        st = self.stage(stage)
        consumers = self._stage_consumers(st)
        keys = []
        for node in sorted(ancestors(self.graph, f"stage:{st.name}")):
            attrs = self.graph.nodes[node]
            if attrs["type"] == "signal" and any(v in consumers for v in self.graph.successors(node)):
                keys.append(attrs["key"])
        return sorted(keys, key=lambda k: k.sort_key)

    def captures(self, stage: str | StageSpec) -> list[ModelCapture]:
        """Per model the capture points, early-stop block, head and eager-attention needs of one stage.

        Order: the stage's students, then its teachers, then other models (interventions), each once.
        A model named only by an intervention (e.g. Theseus' teacher blocks) is listed with no points and
        runs whole.
        """
        st = self.stage(stage)
        by_model: dict[str, list[SignalKey]] = {}
        for key in self.captured_signals(st):
            by_model.setdefault(key.model, []).append(key)
        wanted = [*st.students, *st.teachers, *sorted(self._intervention_models(st))]
        names = [m for m in dict.fromkeys(wanted) if m in by_model or m in st.students
                 or m in self._intervention_models(st)]
        names += sorted(m for m in by_model if m not in names)
        return [self._model_capture(st, m, by_model.get(m, [])) for m in names]

    def unused_teachers(self, stage: str | StageSpec) -> list[str]:
        """Teachers of a stage that no term reads and no intervention uses: they are not loaded."""
        st = self.stage(stage)
        used = {c.model for c in self.captures(st)}
        return [t for t in st.teachers if t not in used]

    def last_use(self, stage: str | StageSpec) -> dict[SignalKey, str]:
        """Captured signal -> id of the last term (in loss order) reading it; the runtime frees it after that."""
        last: dict[SignalKey, str] = {}
        for term in self.stage(stage).loss:
            for key in _leaves(term.target) + _leaves(term.pred):
                if key.model is not None:
                    last[key] = term.id
        return dict(sorted(last.items(), key=lambda kv: kv[0].sort_key))

    def signal_bytes(self, stage: str | StageSpec, micro_batch: int, seq_len: int) -> dict[str, int]:
        """Model -> bytes of its captured signals for one micro-batch (all live between forward and loss)."""
        out: dict[str, int] = {c.model: 0 for c in self.captures(stage)}
        for key in self.captured_signals(stage):
            attrs = self.graph.nodes[key.node_id]
            out[key.model] += numel(attrs["shape"], micro_batch, seq_len) * attrs["dtype_bytes"]
        return out

    def fusable_heads(self, stage: str | StageSpec) -> frozenset[str]:
        """Models of a stage whose logits nothing but chunked logit losses read (directly or through a vocabulary
        column selection), with an LM head the runtime can fuse: the loss can form their logits chunk by chunk
        from the final hidden states. Stages with interventions fuse nothing (they may read logits themselves)."""
        st = self.stage(stage)
        if st.interventions:
            return frozenset()
        consumers = self._stage_consumers(st)
        out = set()
        for key in self.captured_signals(st):
            model = self.spec.models[key.model]
            if key.kind != "logits" or model.head.kind != "lm" or model.arch.family not in FUSABLE_FAMILIES:
                continue
            readers = [v for v in self.graph.successors(key.node_id) if v in consumers]
            if readers and all(self._reads_logits_chunked(v, consumers) for v in readers):
                out.add(key.model)
        return frozenset(out)

    def _reads_logits_chunked(self, node: str, consumers: set[str]) -> bool:
        attrs = self.graph.nodes[node]
        if attrs["type"] == "term":
            return attrs["fn"] in CHUNKED_LOSSES
        if attrs["type"] != "op" or attrs["op"] != "select_vocab":
            return False
        after = [v for v in self.graph.successors(node) if v in consumers]
        return bool(after) and all(self.graph.nodes[v]["type"] == "term" and self.graph.nodes[v]["fn"] in
                                   CHUNKED_LOSSES - {"ce"} for v in after)

    def learned_modules(self, stage: str | StageSpec) -> dict[str, int]:
        """Learned module key -> parameter count (projections: in*out weights + out bias) used by a stage."""
        st = self.stage(stage)
        out: dict[str, int] = {}
        for node in ancestors(self.graph, f"stage:{st.name}"):
            attrs = self.graph.nodes[node]
            if attrs["type"] == "op" and attrs["module"] is not None:
                out[attrs["module"]] = attrs["params"]
        return dict(sorted(out.items()))

    def consumers(self, key: SignalKey) -> list[str]:
        """Term ids (``stage:id``) that read a signal directly or through ops."""
        if key.node_id not in self.graph:
            return []
        terms = [n for n in descendants(self.graph, key.node_id) if self.graph.nodes[n]["type"] == "term"]
        return sorted(t.removeprefix("term:") for t in terms)

    # ------------------------------------------------------------ helpers

    def _stage_consumers(self, st: StageSpec) -> set[str]:
        anc = ancestors(self.graph, f"stage:{st.name}")
        return {n for n in anc if self.graph.nodes[n]["type"] in ("op", "term")}

    def _intervention_models(self, st: StageSpec) -> set[str]:
        return {m for iv in st.interventions for m in iv.models}

    def _model_capture(self, st: StageSpec, model: str, keys: list[SignalKey]) -> ModelCapture:
        kinds = {k.kind for k in keys}
        needs_head = bool(kinds & HEAD_KINDS)
        layers = [k.layer for k in keys if k.layer is not None]
        full = needs_head or model in st.students or not keys
        # embeddings alone still run block 0: adapters stop *after* a block, and block 0 is cheap
        stop = None if full else max(layers, default=0)
        eager = sorted({k.layer for k in keys if k.kind in ATTENTION_KINDS})
        points = [CapturePoint(kind=k.kind, layer=k.layer) for k in keys]
        return ModelCapture(model=model, points=points, stop_after_layer=stop, needs_head=needs_head,
                            eager_attention_layers=eager)


def logit_losses(stage: StageSpec) -> dict[str, tuple[str, ...]]:
    """Model -> the kernels of the stage's terms that read its logits directly or through a vocabulary column
    selection (one entry per term, in loss order); the planner prices their memory per kernel."""
    out: dict[str, list[str]] = {}
    for term in stage.loss:
        for node in (term.target, term.pred):
            model = _logits_model(node)
            if model is not None:
                out.setdefault(model, []).append(term.fn)
    return {m: tuple(fns) for m, fns in out.items()}


def _logits_model(node: Node) -> str | None:
    """The model whose logits a loss operand is (bare, or a vocabulary column selection of them)."""
    if isinstance(node, SignalNode):
        return node.model if node.kind == "logits" else None
    if node.op == "select_vocab" and len(node.inputs) == 1 and isinstance(node.inputs[0], SignalNode):
        return _logits_model(node.inputs[0])
    return None


def _leaves(node: Node) -> list[SignalKey]:
    if isinstance(node, SignalNode):
        return [SignalKey(node.model, node.kind, node.layer)]
    return [leaf for child in node.inputs for leaf in _leaves(child)]


# ---------------------------------------------------------------- building


def build_graph(spec: Spec) -> SignalGraph:
    """The signal graph of every stage of a Spec."""
    g = DiGraph()
    for st in spec.stages:
        g.add_node(f"stage:{st.name}", type="stage", name=st.name)
        for index, term in enumerate(st.loss):
            _add_term(g, spec, st, index, term)
    for model in sorted({a["key"].model for _, a in g.nodes(data=True) if a["type"] == "signal"}):
        _add_chain(g, spec, spec.models[model])
    return SignalGraph(spec=spec, graph=g)


def _add_term(g: DiGraph, spec: Spec, st: StageSpec, index: int, term: LossTerm) -> None:
    node = f"term:{st.name}:{term.id}"
    g.add_node(node, type="term", stage=st.name, id=term.id, fn=term.fn, index=index, method=term.method,
               weight=term.weight.value, mask=term.mask)
    g.add_edge(node, f"stage:{st.name}", kind="input")
    for role, tree in (("target", term.target), ("pred", term.pred)):
        src = _add_tree(g, spec, tree)
        roles = g.edges[src, node]["role"] + "," + role if g.has_edge(src, node) else role
        g.add_edge(src, node, kind="input", role=roles)


def _add_tree(g: DiGraph, spec: Spec, tree: Node) -> str:
    if isinstance(tree, SignalNode):
        return _add_signal(g, spec, SignalKey(tree.model, tree.kind, tree.layer))
    node = _op_id(tree)
    if node not in g:
        g.add_node(node, type="op", op=tree.op, params=tree.param_count() if isinstance(tree, Project) else 0,
                   module=tree.module,
                   learned=tree.module is not None)
    for position, child in enumerate(tree.inputs):
        g.add_edge(_add_tree(g, spec, child), node, kind="input", position=position)
    return node


def _op_id(op: OpNode) -> str:
    # the whole subtree (inputs, params, module key) decides identity, so equal computations share a node
    text = json.dumps(op.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return f"op:{op.op}:{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _add_signal(g: DiGraph, spec: Spec, key: SignalKey) -> str:
    node = key.node_id
    if node in g:
        return node
    if key.model is None:
        shape: Shape = ("b",) if key.kind == "labels" else ("b", "s")
        g.add_node(node, type="data", key=key, shape=shape, dtype="int64", dtype_bytes=8,
                   bytes_per_token=_bytes_per_token(shape, 8))
        return node
    model = spec.models[key.model]
    shape = signal_shape(model, key.kind)
    size = DTYPE_BYTES[model.dtype]
    g.add_node(node, type="signal", key=key, shape=shape, dtype=model.dtype, dtype_bytes=size,
               bytes_per_token=_bytes_per_token(shape, size))
    return node


def _add_chain(g: DiGraph, spec: Spec, model: ModelSpec) -> None:
    """embeddings -> hidden[0..L-1] -> head; other block signals depend on their block's input."""
    name, n_layers = model.name, model.arch.num_layers
    chain = [_add_signal(g, spec, SignalKey(name, "embeddings"))]
    chain += [_add_signal(g, spec, SignalKey(name, "hidden", i)) for i in range(n_layers)]
    for a, b in zip(chain, chain[1:]):
        g.add_edge(a, b, kind="chain")
    for node, attrs in list(g.nodes(data=True)):
        key = attrs.get("key")
        if attrs["type"] != "signal" or key.model != name:
            continue
        if key.kind in HEAD_KINDS:
            g.add_edge(chain[-1], node, kind="chain")
        elif key.kind in LAYERED_KINDS and key.kind != "hidden":
            g.add_edge(chain[key.layer], node, kind="chain")  # chain[i] is the input of block i


# ---------------------------------------------------------------- DOT export


def to_dot(sg: SignalGraph) -> str:
    """Graphviz text: one cluster per model (unread runs of blocks collapsed), ops, terms and stages."""
    g = sg.graph
    lines = ["digraph gkd {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    shown: set[str] = set()
    models = sorted({a["key"].model for _, a in g.nodes(data=True) if a["type"] == "signal"})
    for model in models:
        lines += _dot_model_cluster(g, sg.spec.models[model], shown)
    data = sorted(n for n, a in g.nodes(data=True) if a["type"] == "data")
    if data:
        lines.append('  subgraph cluster_data { label="data"; style=dashed;')
        lines += [f"    {_q(n)} [shape=note, label={_q(str(g.nodes[n]['key']))}];" for n in data]
        lines.append("  }")
        shown.update(data)
    for n in sorted(n for n, a in g.nodes(data=True) if a["type"] in ("op", "term", "stage")):
        lines.append(f"  {_q(n)} [{_dot_attrs(g.nodes[n])}];")
        shown.add(n)
    for u, v in sorted(g.edges()):
        if u in shown and v in shown and g.edges[u, v]["kind"] == "input":
            role = g.edges[u, v].get("role")
            lines.append(f"  {_q(u)} -> {_q(v)}" + (f" [label={_q(role)}];" if role else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_model_cluster(g: DiGraph, model: ModelSpec, shown: set[str]) -> list[str]:
    name, n_layers = model.name, model.arch.num_layers
    mine = [(n, a["key"]) for n, a in g.nodes(data=True) if a["type"] == "signal" and a["key"].model == name]
    read = {n for n, _ in mine if any(g.edges[n, v]["kind"] == "input" for v in g.successors(n))}
    side_inputs = {k.layer - 1 for n, k in mine if n in read and k.kind in LAYERED_KINDS and k.kind != "hidden"}
    # chain positions worth drawing: -1 = embeddings, i = hidden[i], n_layers = the head
    keep = {-1} | side_inputs | {k.layer for n, k in mine if n in read and k.kind == "hidden"}
    heads = [n for n, k in mine if k.kind in HEAD_KINDS]
    if heads:
        keep.add(n_layers - 1)
    node_at = {-1: f"sig:{name}.embeddings", **{i: f"sig:{name}.hidden[{i}]" for i in range(n_layers)}}
    lines = [f"  subgraph cluster_{_ident(name)} {{",
             f"    label={_q(f'{name} ({model.role}, {n_layers} blocks)')}; style=rounded;"]
    for n, key in sorted(mine, key=lambda nk: nk[1].sort_key):
        if n in read or n in heads or (key.kind in ("embeddings", "hidden") and _pos(key) in keep):
            lines.append(f"    {_q(n)} [{_signal_attrs(g.nodes[n], n in read)}];")
            shown.add(n)
    positions = sorted(keep)
    for a, b in zip(positions, positions[1:]):
        label = f"block {b}" if b == a + 1 else f"blocks {a + 1}..{b}"
        lines.append(f"    {_q(node_at[a])} -> {_q(node_at[b])} [label={_q(label)}, style=dashed];")
    for n, key in mine:
        if key.kind in HEAD_KINDS:
            lines.append(f"    {_q(node_at[n_layers - 1])} -> {_q(n)} [label=\"head\", style=dashed];")
        elif n in read and key.kind in LAYERED_KINDS and key.kind != "hidden":
            lines.append(f"    {_q(node_at[key.layer - 1])} -> {_q(n)} [style=dotted];")
    lines.append("  }")
    return lines


def _pos(key: SignalKey) -> int:
    return -1 if key.kind == "embeddings" else key.layer


def _signal_attrs(attrs: dict, read: bool) -> str:
    shape = ",".join(str(d) for d in attrs["shape"])
    key: SignalKey = attrs["key"]
    label = f"{str(key).split('.', 1)[1]}\\n[{shape}] {attrs['dtype']}"
    style = "filled" if read else "solid"
    return f"shape=ellipse, style={style}, fillcolor=lightblue, label={_q(label, raw=True)}"


def _dot_attrs(attrs: dict) -> str:
    if attrs["type"] == "op":
        extra = f"\\nmodule: {attrs['module']}" if attrs["module"] else ""
        return f"shape=box, style=rounded, label={_q(attrs['op'] + extra, raw=True)}"
    if attrs["type"] == "term":
        label = f"{attrs['id']}\\n{attrs['fn']} x{attrs['weight']:g}"
        return f"shape=box, label={_q(label, raw=True)}"
    return f"shape=doubleoctagon, style=filled, fillcolor=khaki, label={_q('stage ' + attrs['name'])}"


def _q(text: str, raw: bool = False) -> str:
    """A DOT string literal; ``raw`` keeps ``\\n`` escapes written on purpose."""
    body = text.replace('"', '\\"') if raw else text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{body}"'


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def render(sg: SignalGraph, path: str | Path) -> Path:
    """Write the graph: ``.dot`` as text, ``.svg``/``.png``/``.pdf`` through Graphviz' ``dot`` binary."""
    path = Path(path)
    text = to_dot(sg)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv"):
        path.write_text(text, encoding="utf-8")
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise GraphRenderError(f"cannot write a graph as '.{fmt}' ({path}); use .dot, .svg, .png or .pdf")
    dot = shutil.which("dot")
    if dot is None:
        raise GraphRenderError(f"writing {path} needs Graphviz' 'dot' program, which is not installed; "
                               f"install graphviz or write a .dot file instead")
    proc = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=text.encode(), capture_output=True)
    if proc.returncode != 0:
        raise GraphRenderError(f"Graphviz failed writing {path}: {proc.stderr.decode(errors='replace').strip()}")
    return path


def graph_summary(sg: SignalGraph) -> dict[str, int]:
    """Node counts per type (for reports and tests)."""
    counts: dict[str, int] = {}
    for _, attrs in sg.graph.nodes(data=True):
        counts[attrs["type"]] = counts.get(attrs["type"], 0) + 1
    return dict(sorted(counts.items()))

