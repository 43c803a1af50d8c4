"""Nodes, the DAG, and expansion of a stage template over fan-out axes.

Nothing here knows what the stages do: a template says which stage fans out over which axes
and where its inputs come from; expansion makes one node per combination of axis values, and
nodes that come out identical (same stage, params and inputs) are merged into one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from mlcbuild.cache.digests import canonical_digest


@dataclass(frozen=True)
class StageTemplate:
    """One step of a pipeline template.

    ``axes``: the fan-out axes this stage varies over (a subset of the recipe's axes).
    ``inputs``: input name -> upstream stage name (the upstream node with the matching axis
    values is chosen). ``materialize``: where its outputs go in the output directory, as a
    function of the axis values, or None when they stay in the cache.
    """

    stage: str
    axes: tuple[str, ...] = ()
    inputs: Mapping[str, str] = field(default_factory=dict)
    materialize: Callable[[dict[str, str]], str] | None = None


@dataclass(eq=False)
class Node:
    stage: str
    params: Any  # the stage's validated params (a pydantic model)
    inputs: dict[str, "Node"]
    label: str
    axes: dict[str, str]
    materialize: list[str] = field(default_factory=list)  # output-dir subpaths
    namespace: str = ""  # who asked for this node (e.g. the recipe file)

    @property
    def slot(self) -> str:
        """This node's place in its pipeline (namespace and label), whatever its params: what
        ``plan`` compares against to say *what* changed since the last build of that place."""
        return canonical_digest([self.namespace, self.label])

    @property
    def identity(self) -> str:
        """Structural identity: stage, params and the identities of the inputs. Stable across
        runs, independent of content; used to merge nodes and to remember the last build."""
        return canonical_digest(
            {
                "stage": self.stage,
                "params": self.params.model_dump(mode="json"),
                "inputs": {name: node.identity for name, node in sorted(self.inputs.items())},
            }
        )


class Graph:
    """A DAG of nodes in topological order (inputs before the nodes that use them)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._by_identity: dict[str, Node] = {}

    def add(self, node: Node) -> Node:
        """Add ``node``, or return the identical node already present (merging fan-out)."""
        existing = self._by_identity.get(node.identity)
        if existing is not None:
            existing.materialize.extend(p for p in node.materialize if p not in existing.materialize)
            return existing
        self._by_identity[node.identity] = node
        self.nodes.append(node)
        return node

    def merge(self, other: "Graph") -> None:
        """Add every node of ``other`` (another pipeline's DAG): nodes identical to ones already
        here become one node, so what several pipelines share is built once."""
        merged: dict[int, Node] = {}
        for node in other.nodes:
            node.inputs = {name: merged[id(up)] for name, up in node.inputs.items()}
            merged[id(node)] = self.add(node)

    def ancestors(self, node: Node) -> list[Node]:
        seen: dict[int, Node] = {}
        stack = list(node.inputs.values())
        while stack:
            current = stack.pop()
            if id(current) not in seen:
                seen[id(current)] = current
                stack.extend(current.inputs.values())
        order = {id(n): i for i, n in enumerate(self.nodes)}
        return sorted(seen.values(), key=lambda n: order[id(n)])

    def dependents(self, node: Node) -> list[Node]:
        return [n for n in self.nodes if node in n.inputs.values()]

    def select(self, keep: Callable[[Node], bool]) -> "Graph":
        """The subgraph of nodes for which ``keep`` is true, plus everything they need."""
        wanted: set[int] = set()
        for node in self.nodes:
            if keep(node):
                wanted.add(id(node))
                wanted.update(id(a) for a in self.ancestors(node))
        sub = Graph()
        for node in self.nodes:
            if id(node) in wanted:
                sub.nodes.append(node)
                sub._by_identity[node.identity] = node
        return sub


def expand(
    template: Iterable[StageTemplate],
    axes: Mapping[str, list[str]],
    make_params: Callable[[str, dict[str, str]], Any],
    namespace: str = "",
) -> Graph:
    """Expand ``template`` over ``axes``: one node per stage and combination of its axis values.

    ``make_params(stage, axis_values)`` returns the validated params of one node.
    """
    graph = Graph()
    made: dict[tuple[str, tuple], Node] = {}
    for step in template:
        for unknown in set(step.axes) - set(axes):
            raise ValueError(f"stage {step.stage!r} fans out over unknown axis {unknown!r}")
        for combo in itertools.product(*(axes[a] for a in step.axes)):
            values = dict(zip(step.axes, combo))
            inputs = {}
            for input_name, upstream in step.inputs.items():
                upstream_axes = _axes_of(template, upstream)
                key = tuple(values[a] for a in upstream_axes)
                inputs[input_name] = made[(upstream, key)]
            label = step.stage + (f"[{','.join(combo)}]" if combo else "")
            node = Node(
                stage=step.stage,
                params=make_params(step.stage, values),
                inputs=inputs,
                label=label,
                axes=values,
                materialize=[step.materialize(values)] if step.materialize else [],
                namespace=namespace,
            )
            made[(step.stage, combo)] = graph.add(node)
    return graph


def _axes_of(template: Iterable[StageTemplate], stage: str) -> tuple[str, ...]:
    for step in template:
        if step.stage == stage:
            return step.axes
    raise ValueError(f"input names unknown stage {stage!r}")
