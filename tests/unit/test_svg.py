"""Drawing a definition as inline SVG: every node and edge drawn, laid out top down, apart."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kapellmeister.definitions import compile_definition, load_definition, parse_definition
from kapellmeister.drawing import COLOURS, END, START, Diagram, Edge, diagram
from kapellmeister.ui.svg import _layout, _render, to_svg
from tests.unit.test_decider_flow import FORK
from tests.unit.test_decider_graph import BREW

ROOT = Path(__file__).parents[2]
DEFINITIONS = ROOT / "services" / "conductor" / "definitions"
PLAN_DAY = load_definition(DEFINITIONS / "plan_day.yaml")
APPROVAL = load_definition(DEFINITIONS / "approval.yaml")
# A FORK whose second branch holds a GRAPH: parallel branches beside a cluster.
FORKED_BREW = compile_definition(
    parse_definition(
        {
            "name": "forked-brew",
            "tasks": [
                {
                    "ref": "both",
                    "type": "FORK",
                    "branches": [
                        [{"ref": "a", "type": "SIMPLE", "task": "t.a"}],
                        BREW[:1],
                    ],
                },
                {"ref": "joined", "type": "JOIN", "join_on": ["a", "brew"]},
            ],
        }
    )
)
EXAMPLES = {
    "plan_day": PLAN_DAY,
    "approval": APPROVAL,
    "brew": compile_definition(parse_definition({"name": "brew", "tasks": BREW})),
    "fork": compile_definition(parse_definition({"name": "fork", "tasks": FORK})),
    "forked_brew": FORKED_BREW,
}
SVG = "{http://www.w3.org/2000/svg}"


def nodes(svg: str) -> dict[str, ET.Element]:
    found = ET.fromstring(svg).iter(f"{SVG}g")
    drawn = [g for g in found if g.get("class") == "node"]
    refs = [g.get("data-ref") for g in drawn]
    assert len(refs) == len(set(refs)), "a node drawn twice"
    return {str(g.get("data-ref")): g for g in drawn}


def centre(node: ET.Element) -> tuple[float, float]:
    found = re.fullmatch(r"translate\(([-\d.]+),([-\d.]+)\)", node.get("transform", ""))
    assert found
    return float(found[1]), float(found[2])


def edges(svg: str) -> list[tuple[str | None, str | None]]:
    found = ET.fromstring(svg).iter(f"{SVG}path")
    return [(p.get("data-source"), p.get("data-target")) for p in found if p.get("class") == "edge"]


def test_plan_day_draws_every_node_once_and_every_edge():
    svg = to_svg(PLAN_DAY)
    drawn = diagram(PLAN_DAY)
    assert set(nodes(svg)) == set(drawn.labels)
    assert edges(svg) == [(e.source, e.target) for e in drawn.edges]
    root = ET.fromstring(svg)
    assert root.get("aria-label") == "plan_day"
    assert root.get("role") == "img"
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    labels = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "edge-label"]
    assert labels == ["free", "default", "rain=false snow=false", "default"]
    weather = nodes(svg)["weather"]
    assert [s.text for s in weather.iter(f"{SVG}tspan")] == ["weather", "SIMPLE weather.report"]
    assert weather.findtext(f"{SVG}title") == "weather\nSIMPLE weather.report"


def test_statuses_colour_the_nodes():
    statuses = {"agenda": "COMPLETED", "weather": "FAILED", "busy": "SKIPPED"}
    drawn = nodes(to_svg(PLAN_DAY, statuses))
    for ref, status in statuses.items():
        node = drawn[ref]
        assert node.get("data-status") == status
        fill, stroke = COLOURS[status]
        shape = node[1]
        assert (shape.get("fill"), shape.get("stroke")) == (fill, stroke)
        assert node.findtext(f"{SVG}title", "").endswith(f"\nstatus: {status}")
    assert drawn["busy"][1].get("stroke-dasharray")  # SKIPPED: dashed
    assert drawn["agenda"][1].get("stroke-dasharray") is None
    assert drawn["notify"].get("data-status") == ""
    assert drawn["notify"][1].get("fill") == "#ffffff"


def test_shapes_follow_the_diagram():
    drawn = nodes(to_svg(PLAN_DAY))
    assert drawn["is_free"][1].tag == f"{SVG}polygon"  # SWITCH: a diamond
    assert drawn["agenda"][1].tag == f"{SVG}rect"
    assert float(drawn[START][1].get("rx", 0)) == float(drawn[START][1].get("height", 0)) / 2


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_edge_points_down_from_rank_to_rank(name):
    svg = to_svg(EXAMPLES[name])
    at = {ref: centre(node) for ref, node in nodes(svg).items()}
    for source, target in edges(svg):
        assert at[str(target)][1] > at[str(source)][1], (source, target)
    assert max(y for _, y in at.values()) == at[END][1]  # the end is last, alone
    assert [ref for ref, (_, y) in at.items() if y == at[END][1]] == [END]


@pytest.mark.parametrize("name", EXAMPLES)
def test_nodes_labels_and_dummies_never_overlap(name):
    layout = _layout(diagram(EXAMPLES[name]))
    boxes = [
        (i.x - i.width / 2, i.y - i.height / 2, i.x + i.width / 2, i.y + i.height / 2, i.key)
        for i in layout.items.values()
    ]
    for a, b in itertools.combinations(boxes, 2):
        apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert apart, (a[4], b[4])
    assert all(left >= 0 and right <= layout.width for left, _, right, _, _ in boxes)
    assert all(top >= 0 and bottom <= layout.height for _, top, _, bottom, _ in boxes)


@pytest.mark.parametrize("name", ["brew", "forked_brew"])
def test_a_graph_is_a_box_around_its_members_and_nothing_else(name):
    drawn = diagram(EXAMPLES[name])
    layout = _layout(drawn)
    ((graph, members),) = drawn.clusters.items()
    x0, y0, x1, y1 = layout.clusters[graph]
    for ref in drawn.labels:
        item = layout.items[ref]
        inside = x0 < item.x - item.width / 2 and item.x + item.width / 2 < x1
        inside = inside and y0 < item.y - item.height / 2 and item.y + item.height / 2 < y1
        assert inside == (ref in members), ref
    svg = ET.fromstring(to_svg(EXAMPLES[name]))
    assert [r.get("data-graph") for r in svg.iter(f"{SVG}rect") if r.get("class") == "cluster"] == [
        graph
    ]
    labels = [t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "cluster-label"]
    assert labels == [f"{graph}: artefacts"]
    dashed = [p for p in svg.iter(f"{SVG}path") if p.get("stroke-dasharray")]
    assert [(p.get("data-source"), p.get("data-target")) for p in dashed] == [("dry_hop", "bottle")]


def test_a_fork_puts_its_branches_side_by_side():
    at = {ref: centre(node) for ref, node in nodes(to_svg(EXAMPLES["fork"])).items()}
    assert at["a"][1] == at["b"][1]
    assert at["a"][0] != at["b"][0]
    assert at["b"][1] < at["b2"][1] < at["joined"][1]


def test_text_is_escaped():
    definition = compile_definition(
        parse_definition(
            {
                "name": "odd-name_1",
                "tasks": [
                    {
                        "ref": "pick",
                        "type": "SWITCH",
                        "expression": "${workflow.input.x}",
                        "cases": {'<a & "b">': [{"ref": "x_1", "type": "SIMPLE", "task": "t.x"}]},
                        "default": [{"ref": "y", "type": "SIMPLE", "task": "t.y"}],
                    }
                ],
            }
        )
    )
    svg = to_svg(definition, {"x_1": 'SKI<P>"&'})
    assert '<a & "b">' not in svg
    root = ET.fromstring(svg)  # well-formed
    assert root.get("aria-label") == "odd-name_1"
    labels = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "edge-label"]
    assert '<a & "b">' in labels
    assert nodes(svg)["x_1"].get("data-status") == 'SKI<P>"&'


def test_a_hand_made_diagram_with_a_cycle_and_odd_refs_is_drawn():
    drawn = Diagram("loop <&>")
    drawn.labels.update({START: "start", END: "end", "a-b": "a-b\n<x>", "c_d": "c_d", "e": "e"})
    drawn.shapes.update({START: "round", END: "round", "a-b": "box", "c_d": "diamond", "e": "box"})
    drawn.edges += [
        Edge(START, "a-b"),
        Edge("a-b", "c_d", "on"),
        Edge("c_d", "a-b", "again & again", dashed=True),  # closes a cycle: drawn upward
        Edge("c_d", "c_d", "self"),
        Edge("c_d", "e"),
        Edge("e", END),
    ]
    svg = _render(drawn, {})
    at = {ref: centre(node) for ref, node in nodes(svg).items()}
    assert at[START][1] < at["a-b"][1] < at["c_d"][1] < at["e"][1] < at[END][1]
    assert edges(svg) == [(e.source, e.target) for e in drawn.edges]
    assert ET.fromstring(svg).get("aria-label") == "loop <&>"
    paths = [p for p in ET.fromstring(svg).iter(f"{SVG}path") if p.get("class") == "edge"]
    ends = [[float(n) for n in re.findall(r"-?[\d.]+", p.get("d", ""))] for p in paths]
    assert ends[1][-1] > ends[1][1]  # a-b -> c_d goes down
    assert ends[2][-1] < ends[2][1]  # c_d -> a-b goes back up, its arrow at a-b


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_drawing_is_deterministic(name):
    statuses = {"agenda": "COMPLETED", "a": "IN_PROGRESS"}
    assert to_svg(EXAMPLES[name], statuses) == to_svg(EXAMPLES[name], dict(statuses))
