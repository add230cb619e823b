"""A directed graph with node and edge attributes: the subset of networkx's DiGraph API the signal graph uses.

Kept instead of networkx because importing networkx costs 110-135 ms of `gkdc check`'s 0.5 s budget (285 modules,
measured with `python -X importtime`), and the signal graph needs only attributes, successors and reachability.
Names and behaviour follow networkx (``add_node`` / ``add_edge`` update attributes, ``nodes(data=True)``,
``edges[u, v]``, ``ancestors`` / ``descendants``), so code reads the same; tests/test_graph.py checks the
reachability queries against networkx itself. ``to_networkx`` converts for analysis with the real library.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Any


class _NodeView:
    """``g.nodes``: ``g.nodes[n]`` is n's attribute dict; ``g.nodes(data=True)`` yields ``(n, attrs)``."""

    def __init__(self, attrs: dict[Hashable, dict[str, Any]]):
        self._attrs = attrs

    def __call__(self, data: bool = False) -> Iterable:
        return list(self._attrs.items()) if data else list(self._attrs)

    def __getitem__(self, node: Hashable) -> dict[str, Any]:
        return self._attrs[node]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._attrs)

    def __len__(self) -> int:
        return len(self._attrs)

    def __contains__(self, node: object) -> bool:
        return node in self._attrs


class _EdgeView:
    """``g.edges``: ``g.edges[u, v]`` is the edge's attribute dict; ``g.edges()`` lists ``(u, v)`` pairs."""

    def __init__(self, succ: dict[Hashable, dict[Hashable, dict[str, Any]]]):
        self._succ = succ

    def __call__(self, data: bool = False) -> list:
        return [(u, v, a) if data else (u, v) for u, out in self._succ.items() for v, a in out.items()]

    def __getitem__(self, edge: tuple[Hashable, Hashable]) -> dict[str, Any]:
        u, v = edge
        return self._succ[u][v]

    def __iter__(self) -> Iterator[tuple[Hashable, Hashable]]:
        return iter(self())

    def __len__(self) -> int:
        return sum(len(out) for out in self._succ.values())


class DiGraph:
    """Nodes in insertion order, each with an attribute dict; at most one edge u -> v, with its attribute dict."""

    def __init__(self) -> None:
        self._node: dict[Hashable, dict[str, Any]] = {}
        self._succ: dict[Hashable, dict[Hashable, dict[str, Any]]] = {}
        self._pred: dict[Hashable, dict[Hashable, dict[str, Any]]] = {}
        self.nodes = _NodeView(self._node)
        self.edges = _EdgeView(self._succ)

    def add_node(self, node: Hashable, **attrs: Any) -> None:
        if node not in self._node:
            self._node[node], self._succ[node], self._pred[node] = {}, {}, {}
        self._node[node].update(attrs)

    def add_edge(self, u: Hashable, v: Hashable, **attrs: Any) -> None:
        for n in (u, v):
            if n not in self._node:
                self.add_node(n)
        data = self._succ[u].setdefault(v, {})
        data.update(attrs)
        self._pred[v][u] = data

    def has_edge(self, u: Hashable, v: Hashable) -> bool:
        return v in self._succ.get(u, ())

    def successors(self, node: Hashable) -> Iterator[Hashable]:
        return iter(self._succ[node])

    def predecessors(self, node: Hashable) -> Iterator[Hashable]:
        return iter(self._pred[node])

    def __contains__(self, node: object) -> bool:
        return node in self._node

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._node)

    def __len__(self) -> int:
        return len(self._node)

    def to_networkx(self):
        """The same graph as a networkx.DiGraph (imports networkx: not for the check path)."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self._node.items())
        g.add_edges_from(self.edges(data=True))
        return g


def _reach(adjacency: dict[Hashable, dict[Hashable, Any]], source: Hashable) -> set[Hashable]:
    if source not in adjacency:
        raise KeyError(f"node {source!r} is not in the graph")
    seen: set[Hashable] = set()
    stack = [source]
    while stack:
        for nxt in adjacency[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    seen.discard(source)
    return seen


def ancestors(g: DiGraph, node: Hashable) -> set[Hashable]:
    """Every node with a path to ``node`` (``node`` itself excluded), as networkx.ancestors."""
    return _reach(g._pred, node)


def descendants(g: DiGraph, node: Hashable) -> set[Hashable]:
    """Every node reachable from ``node`` (``node`` itself excluded), as networkx.descendants."""
    return _reach(g._succ, node)
