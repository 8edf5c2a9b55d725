"""Drawing a definition (and a workflow's progress through it): Mermaid and Graphviz DOT.

One `Diagram` is read off the compiled definition: a node per task (its type and agent
task, a ``when`` noted), the sequence edges, a SWITCH's cases labelled with their keys,
a FORK's branches, a compensation as a dashed "undo" edge, and a GRAPH as a cluster whose
edges go from producer to consumer labelled with the artefact (dashed when optional).
Given a workflow's task statuses, nodes are coloured by them. The output is
deterministic, so a drawing can be checked into a README and tested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from kapellmeister.definitions import (
    Definition,
    ForkTask,
    GraphTask,
    Node,
    SimpleTask,
    SubWorkflowTask,
    SwitchTask,
)

__all__ = ["Diagram", "diagram", "to_dot", "to_mermaid"]

START, END = "start__", "end__"

# Fill and border per task status (a workflow drawn with its progress).
COLOURS: Mapping[str, tuple[str, str]] = {
    "COMPLETED": ("#d4f7d4", "#2e7d32"),
    "SCHEDULED": ("#dbe9ff", "#1565c0"),
    "IN_PROGRESS": ("#dbe9ff", "#1565c0"),
    "FAILED": ("#ffd6d6", "#c62828"),
    "TIMED_OUT": ("#ffe4c4", "#ef6c00"),
    "SKIPPED": ("#eeeeee", "#9e9e9e"),
    "CANCELED": ("#f5f5f5", "#bdbdbd"),
}


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str = ""
    dashed: bool = False


@dataclasses.dataclass
class Diagram:
    name: str
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    shapes: dict[str, str] = dataclasses.field(default_factory=dict)  # box, diamond, round
    edges: list[Edge] = dataclasses.field(default_factory=list)
    clusters: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _label(node: Node) -> str:
    task = node.task
    kind = type(task).__struct_config__.tag
    line = f"{task.ref}\n{kind}"
    if isinstance(task, SimpleTask):
        line += f" {task.task}"
    elif isinstance(task, SubWorkflowTask):
        line += f" {task.workflow}"
    if task.when is not None:
        line += "\n(when)"
    return line


def _first(tasks: list[object]) -> str | None:
    return getattr(tasks[0], "ref", None) if tasks else None


def diagram(definition: Definition) -> Diagram:
    """The nodes, edges and clusters of ``definition``."""
    drawn = Diagram(definition.name)
    drawn.shapes[START], drawn.shapes[END] = "round", "round"
    drawn.labels[START], drawn.labels[END] = "start", "end"
    drawn.edges.append(Edge(START, definition.first))
    for ref, node in definition.nodes.items():
        drawn.labels[ref] = _label(node)
        drawn.shapes[ref] = "diamond" if isinstance(node.task, SwitchTask) else "box"
        _out_edges(definition, drawn, ref, node)
    return drawn


def _out_edges(definition: Definition, drawn: Diagram, ref: str, node: Node) -> None:
    task = node.task
    inner = _inner_edges(definition, drawn, ref, task)
    # A SWITCH or FORK goes on through its branches; its own edge only for a case that
    # has no task (or for no branch at all).
    if not inner or (isinstance(task, SwitchTask) and _has_empty_case(task)):
        _flow_edge(definition, drawn, ref, node)


def _has_empty_case(task: SwitchTask) -> bool:
    return not task.default or any(not branch for branch in task.cases.values())


def _flow_edge(definition: Definition, drawn: Diagram, ref: str, node: Node) -> None:
    """Where the walk goes once ``ref`` is done."""
    after = node.after
    match after.kind:
        case "next":
            assert after.ref is not None
            drawn.edges.append(Edge(ref, after.ref))
        case "end":
            drawn.edges.append(Edge(ref, END))
        case "branch" | "instance":
            assert after.ref is not None
            fork = definition.nodes[after.ref].after
            target = fork.ref if fork.kind == "next" and fork.ref else END
            drawn.edges.append(Edge(ref, target))
        case "compensation":
            assert after.ref is not None
            drawn.edges.insert(0, Edge(after.ref, ref, "undo", dashed=True))


def _inner_edges(definition: Definition, drawn: Diagram, ref: str, task: object) -> bool:
    """The edges into what ``task`` contains; whether it had any."""
    before = len(drawn.edges)
    match task:
        case SwitchTask(cases=cases, default=default):
            for key, branch in [*cases.items(), ("default", default or [])]:
                if branch:
                    drawn.edges.append(Edge(ref, branch[0].ref, key))
        case ForkTask(branches=branches, each=each):
            drawn.edges += [Edge(ref, branch[0].ref) for branch in branches if branch]
            if each is not None:
                drawn.edges.append(Edge(ref, each.ref, "each item"))
        case GraphTask(tasks=members):
            _graph_edges(definition, drawn, ref, [m.ref for m in members])
            return False  # the GRAPH's own edge leads on from it
    return len(drawn.edges) > before


def _graph_edges(definition: Definition, drawn: Diagram, ref: str, members: list[str]) -> None:
    plan = definition.graphs[ref]
    drawn.clusters[ref] = members
    for member in plan.members:
        requires = plan.requires[member]
        if not any(plan.producer.get(name) for name, _ in requires):
            drawn.edges.append(Edge(ref, member))
        for name, optional in requires:
            producer = plan.producer.get(name)
            if producer:
                drawn.edges.append(Edge(producer, member, name, dashed=optional))


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("\n", "<br/>")


def to_mermaid(definition: Definition, statuses: Mapping[str, str] | None = None) -> str:
    """The definition as a Mermaid flowchart, nodes coloured by ``statuses`` if given."""
    drawn = diagram(definition)
    lines = ["flowchart TD"]
    inside = {ref for members in drawn.clusters.values() for ref in members}

    def node(ref: str) -> str:
        text = _mermaid_text(drawn.labels[ref])
        match drawn.shapes[ref]:
            case "diamond":
                return f'{ref}{{"{text}"}}'
            case "round":
                return f'{ref}(("{text}"))'
        return f'{ref}["{text}"]'

    for ref in drawn.labels:
        if ref not in inside:
            lines.append(f"  {node(ref)}")
    for graph, members in drawn.clusters.items():
        lines.append(f'  subgraph {graph}__artefacts ["{graph}: artefacts"]')
        lines += [f"    {node(ref)}" for ref in members]
        lines.append("  end")
    for edge in drawn.edges:
        arrow = "-.->" if edge.dashed else "-->"
        label = f"|{_mermaid_text(edge.label)}|" if edge.label else ""
        lines.append(f"  {edge.source} {arrow}{label} {edge.target}")
    for status, (fill, stroke) in COLOURS.items():
        refs = sorted(r for r, s in (statuses or {}).items() if s == status and r in drawn.labels)
        if refs:
            lines.append(f"  classDef {status} fill:{fill},stroke:{stroke}")
            lines.append(f"  class {','.join(refs)} {status}")
    return "\n".join(lines) + "\n"


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(definition: Definition, statuses: Mapping[str, str] | None = None) -> str:
    """The definition as Graphviz DOT, nodes coloured by ``statuses`` if given."""
    drawn = diagram(definition)
    lines = [
        f'digraph "{_dot_text(drawn.name)}" {{',
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica"];',
    ]
    inside = {ref for members in drawn.clusters.values() for ref in members}

    def node(ref: str) -> str:
        shape = {"diamond": "diamond", "round": "circle"}.get(drawn.shapes[ref], "box")
        attributes = [f'label="{_dot_text(drawn.labels[ref])}"', f"shape={shape}"]
        status = (statuses or {}).get(ref, "")
        if status in COLOURS:
            fill, stroke = COLOURS[status]
            attributes += [f'fillcolor="{fill}"', f'color="{stroke}"']
            if status == "SKIPPED":
                attributes.append('style="rounded,filled,dashed"')
        return f'"{ref}" [{", ".join(attributes)}];'

    for ref in drawn.labels:
        if ref not in inside:
            lines.append(f"  {node(ref)}")
    for graph, members in drawn.clusters.items():
        lines.append(f'  subgraph "cluster_{graph}" {{')
        lines.append(f'    label="{graph}: artefacts"; style=dashed;')
        lines += [f"    {node(ref)}" for ref in members]
        lines.append("  }")
    for edge in drawn.edges:
        attributes = []
        if edge.label:
            attributes.append(f'label="{_dot_text(edge.label)}"')
        if edge.dashed:
            attributes.append("style=dashed")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f'  "{edge.source}" -> "{edge.target}"{suffix};')
    lines.append("}")
    return "\n".join(lines) + "\n"
