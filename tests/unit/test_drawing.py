"""Drawing definitions and workflows: Mermaid and DOT, read off the compiled definition."""

from __future__ import annotations

from pathlib import Path

from kapellmeister.definitions import compile_definition, load_definition, parse_definition
from kapellmeister.drawing import diagram, to_dot, to_mermaid
from tests.unit.test_decider_graph import BREW

ROOT = Path(__file__).parents[2]
PLAN_DAY = load_definition(ROOT / "services" / "conductor" / "definitions" / "plan_day.yaml")
BREWING = compile_definition(parse_definition({"name": "brew", "tasks": BREW}))


def edges(definition) -> set[tuple[str, str, str, bool]]:
    return {(e.source, e.target, e.label, e.dashed) for e in diagram(definition).edges}


def test_plan_day_is_drawn_as_its_walk():
    found = edges(PLAN_DAY)
    assert {
        ("start__", "agenda", "", False),
        ("agenda", "is_free", "", False),
        ("is_free", "weather", "free", False),
        ("is_free", "busy", "default", False),
        ("notify", "end__", "", False),
    } <= found
    # A SWITCH whose every case has a task goes on through them, not past them.
    assert ("is_free", "notify", "", False) not in found


def test_a_graph_is_a_cluster_with_its_artefacts_on_the_edges():
    drawn = diagram(BREWING)
    assert drawn.clusters == {"brew": ["malt", "hops", "mash", "boil", "dry_hop", "bottle"]}
    assert {
        ("brew", "malt", "", False),
        ("brew", "hops", "", False),
        ("mash", "boil", "wort", False),
        ("hops", "boil", "hops", False),
        ("dry_hop", "bottle", "dry_hopped", True),  # optional: dashed
    } <= edges(BREWING)
    assert "(when)" in drawn.labels["dry_hop"]


def test_mermaid_and_dot_colour_a_workflow_by_its_statuses():
    statuses = {"agenda": "COMPLETED", "weather": "SKIPPED", "is_free": "COMPLETED"}
    mermaid = to_mermaid(PLAN_DAY, statuses)
    assert mermaid.startswith("flowchart TD\n")
    assert "  class agenda,is_free COMPLETED\n" in mermaid
    assert "  class weather SKIPPED\n" in mermaid
    assert "  is_free -->|free| weather\n" in mermaid
    dot = to_dot(BREWING, {"dry_hop": "SKIPPED"})
    assert '  subgraph "cluster_brew" {' in dot
    assert '"dry_hop" -> "bottle" [label="dry_hopped", style=dashed];' in dot
    assert 'style="rounded,filled,dashed"' in dot
    assert to_dot(BREWING) == to_dot(BREWING)  # deterministic


def test_the_readme_shows_plan_day_as_kapellmeister_graph_draws_it():
    readme = (ROOT / "README.md").read_text()
    assert f"```mermaid\n{to_mermaid(PLAN_DAY)}```" in readme
