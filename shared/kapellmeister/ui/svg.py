"""Drawing a definition as inline SVG for a web page: its layout and its markup.

The drawing is the `Diagram` that Mermaid and DOT get (`kapellmeister.drawing`), laid out
here without Graphviz or JavaScript by a small layered (Sugiyama) layout: edges that would
close a cycle are turned round, nodes are ranked by their longest path from the start, an
edge spanning several ranks passes a dummy point on each, every rank is ordered by
barycenters to cut crossings, then placed as near its neighbours as the widths allow.
Node ranks alternate with edge-label ranks, so a label gets a place of its own. The output
is deterministic: the same definition and statuses give the same string.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

from kapellmeister.definitions import Definition
from kapellmeister.drawing import COLOURS, END, Diagram, Edge, diagram

__all__ = ["to_svg"]

CHAR, LINE = 7.2, 16.0  # a node's text at 12px: width per character, height per line
LABEL_CHAR, LABEL_HEIGHT = 6.6, 16.0  # an edge label at 11px
PAD_X, PAD_Y = 12.0, 8.0
NODE_GAP, RANK_GAP, MARGIN = 24.0, 24.0, 16.0
CLUSTER_PAD, CLUSTER_FOOT = 10.0, 24.0  # around a GRAPH's members; below them, its name
DUMMY_WIDTH, EMPTY_ROW = 8.0, 4.0
SWEEPS = 4
NEUTRAL = ("#ffffff", "#5f6b7a")
EDGE_COLOUR = "#555555"
STYLE = (
    "svg.graph text{font:12px sans-serif;fill:#222}"
    "svg.graph .node text tspan:first-child{font-weight:bold}"
    "svg.graph .edge-label,svg.graph .cluster-label{font-size:11px}"
)


@dataclasses.dataclass
class _Item:
    """A node, or a dummy point an edge passes on a rank between its ends (maybe its label)."""

    key: str
    rank: int
    width: float
    height: float
    group: str = ""  # the GRAPH cluster it belongs to
    x: float = 0.0
    y: float = 0.0
    top: float = 0.0  # of its rank's row
    bottom: float = 0.0


@dataclasses.dataclass
class _Route:
    edge: Edge
    chain: list[str]  # item keys from the upper end to the lower end
    turned: bool  # drawn bottom up: it would have closed a cycle
    label: str = ""  # key of the dummy that holds the edge's label


@dataclasses.dataclass
class _Layout:
    nodes: list[str]
    items: dict[str, _Item]
    routes: list[_Route]
    clusters: dict[str, tuple[float, float, float, float]]  # x0, y0, x1, y1
    width: float = 0.0
    height: float = 0.0


def _node_size(label: str, shape: str) -> tuple[float, float]:
    lines = label.split("\n")
    text_w, text_h = max(len(line) for line in lines) * CHAR, len(lines) * LINE
    if shape == "diamond":  # a rhombus twice the text's size holds it
        return 2 * text_w + 2 * PAD_X, 2 * text_h + PAD_Y
    if shape == "round":
        return text_w + 2 * LINE + PAD_X, text_h + 2 * PAD_Y
    return text_w + 2 * PAD_X, text_h + 2 * PAD_Y


def _label_width(text: str) -> float:
    return len(text) * LABEL_CHAR + 8


def _turned(keys: Sequence[str], pairs: Sequence[tuple[str, str]]) -> set[int]:
    """The pairs that close a cycle in a depth-first walk (iterative: no recursion limit)."""
    out: dict[str, list[int]] = {key: [] for key in keys}
    for number, (source, _) in enumerate(pairs):
        out[source].append(number)
    done: dict[str, bool] = {}  # False while on the walk's stack
    turned: set[int] = set()
    for root in keys:
        if root in done:
            continue
        done[root] = False
        stack = [(root, iter(out[root]))]
        while stack:
            key, todo = stack[-1]
            index = next(todo, None)
            if index is None:
                done[key] = True
                stack.pop()
                continue
            target = pairs[index][1]
            if done.get(target) is False:
                turned.add(index)
            elif target not in done:
                done[target] = False
                stack.append((target, iter(out[target])))
    return turned


def _ranks(keys: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Longest path over acyclic ``pairs``, two ranks a step (the odd ones hold labels)."""
    waiting = dict.fromkeys(keys, 0)
    out: dict[str, list[str]] = {key: [] for key in keys}
    for source, target in pairs:
        out[source].append(target)
        waiting[target] += 1
    rank = dict.fromkeys(keys, 0)
    ready = [key for key in keys if not waiting[key]]
    position = 0
    while position < len(ready):
        key = ready[position]
        position += 1
        for target in out[key]:
            rank[target] = max(rank[target], rank[key] + 2)
            waiting[target] -= 1
            if not waiting[target]:
                ready.append(target)
    if END in rank:
        rank[END] = max((r for key, r in rank.items() if key != END), default=0) + 2
    return rank


def _pairs(drawn: Diagram) -> list[tuple[str, str]]:
    """Edges for ranking: the drawn ones, then a GRAPH's members before what follows it."""
    pairs = [(e.source, e.target) for e in drawn.edges]
    for graph, members in drawn.clusters.items():
        after = [e.target for e in drawn.edges if e.source == graph and e.target not in members]
        pairs += [(member, target) for target in after for member in members]
    return pairs


def _routes(drawn: Diagram, items: dict[str, _Item], rank: Mapping[str, int]) -> list[_Route]:
    routes = []
    for index, edge in enumerate(drawn.edges):
        upper, lower, back = edge.source, edge.target, rank[edge.source] > rank[edge.target]
        if back:  # it closed a cycle, so it goes up
            upper, lower = lower, upper
        route = _Route(edge, [upper], back)
        routes.append(route)
        if upper == lower:  # a loop: drawn beside its node, not laid out
            continue
        for step in range(rank[upper] + 1, rank[lower]):
            key = f"{index}~{step}"
            together = items[upper].group == items[lower].group
            item = _Item(key, step, DUMMY_WIDTH, 0.0, items[upper].group if together else "")
            if edge.label and not route.label:
                item.width, item.height, route.label = _label_width(edge.label), LABEL_HEIGHT, key
            items[key] = item
            route.chain.append(key)
        route.chain.append(lower)
    return routes


def _initial_rows(items: Mapping[str, _Item], routes: Sequence[_Route]) -> list[list[str]]:
    """Each rank in order of first appearance along the edges."""
    order = [key for route in routes for key in route.chain] + list(items)
    rows: list[list[str]] = [[] for _ in range(max(i.rank for i in items.values()) + 1)]
    for key in dict.fromkeys(order):
        rows[items[key].rank].append(key)
    return rows


def _neighbours(routes: Sequence[_Route]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    upper: dict[str, list[str]] = {}
    lower: dict[str, list[str]] = {}
    for route in routes:
        for above, below in itertools.pairwise(route.chain):
            lower.setdefault(above, []).append(below)
            upper.setdefault(below, []).append(above)
    return upper, lower


def _crossings(rows: Sequence[list[str]], lower: Mapping[str, list[str]]) -> int:
    count = 0
    for row, below in itertools.pairwise(rows):
        at = {key: i for i, key in enumerate(below)}
        ends = [(i, at[n]) for i, key in enumerate(row) for n in lower.get(key, [])]
        count += sum(
            1 for (a, b), (c, d) in itertools.combinations(ends, 2) if (a - c) * (b - d) < 0
        )
    return count


def _sort(
    row: list[str], near: Mapping[str, list[str]], other: Sequence[str], items: Mapping[str, _Item]
) -> None:
    """Order ``row`` by the barycenter of its neighbours in ``other``, a cluster kept together."""
    at = {key: i for i, key in enumerate(other)}
    centre: dict[str, float] = {}
    for i, key in enumerate(row):
        found = [at[n] for n in near.get(key, [])]
        centre[key] = sum(found) / len(found) if found else float(i)
    groups: dict[str, list[float]] = {}
    for key in row:
        groups.setdefault(items[key].group, []).append(centre[key])

    def place(key: str) -> tuple[float, str, float]:
        group = items[key].group
        if not group:
            return centre[key], "", centre[key]
        return sum(groups[group]) / len(groups[group]), group, centre[key]

    row.sort(key=place)


def _order(rows: list[list[str]], routes: Sequence[_Route], items: Mapping[str, _Item]) -> None:
    upper, lower = _neighbours(routes)
    best, fewest = [row[:] for row in rows], _crossings(rows, lower)
    for _ in range(SWEEPS):
        for r in range(1, len(rows)):
            _sort(rows[r], upper, rows[r - 1], items)
        for r in range(len(rows) - 2, -1, -1):
            _sort(rows[r], lower, rows[r + 1], items)
        crossings = _crossings(rows, lower)
        if crossings < fewest:
            best, fewest = [row[:] for row in rows], crossings
    rows[:] = best


def _closest(wanted: Sequence[float], gaps: Sequence[float]) -> list[float]:
    """Positions nearest ``wanted`` (least squares) keeping ``gaps`` between neighbours.

    Shifted by the gaps, this is isotonic regression: pool adjacent violators.
    """
    offsets = list(itertools.accumulate(gaps, initial=0.0))
    blocks: list[tuple[float, int]] = []  # mean, size
    for target in (w - o for w, o in zip(wanted, offsets, strict=True)):
        mean, size = target, 1
        while blocks and blocks[-1][0] > mean:
            before, count = blocks.pop()
            mean, size = (before * count + mean * size) / (count + size), count + size
        blocks.append((mean, size))
    flat = [mean for mean, size in blocks for _ in range(size)]
    return [x + o for x, o in zip(flat, offsets, strict=True)]


def _gap(a: _Item, b: _Item) -> float:
    gap = (a.width + b.width) / 2 + (NODE_GAP if a.height or b.height else NODE_GAP / 2)
    return gap + (2 * CLUSTER_PAD if a.group != b.group else 0.0)


def _align(row: Sequence[str], near: Mapping[str, list[str]], items: Mapping[str, _Item]) -> None:
    wanted = []
    for key in row:
        found = [items[n].x for n in near.get(key, [])]
        wanted.append(sum(found) / len(found) if found else items[key].x)
    gaps = [_gap(items[a], items[b]) for a, b in itertools.pairwise(row)]
    for key, x in zip(row, _closest(wanted, gaps), strict=True):
        items[key].x = x


def _place_x(rows: Sequence[list[str]], routes: Sequence[_Route], items: dict[str, _Item]) -> None:
    for row in rows:
        gaps = [_gap(items[a], items[b]) for a, b in itertools.pairwise(row)]
        for key, x in zip(row, itertools.accumulate(gaps, initial=-sum(gaps) / 2), strict=True):
            items[key].x = x
    upper, lower = _neighbours(routes)
    both = {key: upper.get(key, []) + lower.get(key, []) for key in items}
    for _ in range(2 * SWEEPS):
        for row in rows[1:]:
            _align(row, upper, items)
        for row in reversed(rows[:-1]):
            _align(row, lower, items)
    for row in rows:
        _align(row, both, items)


def _fits(key: str, x: float, row: Sequence[str], at: int, items: Mapping[str, _Item]) -> bool:
    left = at == 0 or items[row[at - 1]].x + _gap(items[row[at - 1]], items[key]) <= x
    right = at == len(row) - 1 or x + _gap(items[key], items[row[at + 1]]) <= items[row[at + 1]].x
    return left and right


def _straighten(
    rows: Sequence[list[str]], routes: Sequence[_Route], items: dict[str, _Item]
) -> None:
    """Put a long edge's dummies on one vertical line where the rows leave room."""
    at = {key: i for row in rows for i, key in enumerate(row)}
    for route in routes:
        dummies = route.chain[1:-1]
        if len(dummies) < 2:
            continue
        middle = sorted(items[key].x for key in dummies)[len(dummies) // 2]
        ranks = [rows[items[key].rank] for key in dummies]
        for x in (items[route.chain[0]].x, items[route.chain[-1]].x, middle):
            if all(_fits(k, x, row, at[k], items) for k, row in zip(dummies, ranks, strict=True)):
                for key in dummies:
                    items[key].x = x
                break


def _place_y(rows: Sequence[list[str]], items: dict[str, _Item]) -> float:
    y = MARGIN
    for row in rows:
        height = max([EMPTY_ROW, *(items[key].height for key in row)])
        for key in row:
            item = items[key]
            item.y, item.top, item.bottom = y + height / 2, y, y + height
        y += height + RANK_GAP
    return y - RANK_GAP + MARGIN


def _cluster_box(name: str, members: Sequence[_Item]) -> tuple[float, float, float, float]:
    x0 = min(m.x - m.width / 2 for m in members) - CLUSTER_PAD
    x1 = max(m.x + m.width / 2 for m in members) + CLUSTER_PAD
    x1 = max(x1, x0 + _label_width(f"{name}: artefacts") + 2 * CLUSTER_PAD)
    y0 = min(m.y - m.height / 2 for m in members) - CLUSTER_PAD
    y1 = max(m.y + m.height / 2 for m in members) + CLUSTER_FOOT
    return x0, y0, x1, y1


def _fit(layout: _Layout) -> None:
    """Shift everything right of the margin and size the canvas."""
    boxes = [(i.x - i.width / 2, i.x + i.width / 2) for i in layout.items.values()]
    boxes += [(x0, x1) for x0, _, x1, _ in layout.clusters.values()]
    boxes += [(0.0, _loop_label(r, layout.items[r.chain[0]])[0] + _label_width(r.edge.label) / 2)
              for r in layout.routes if len(r.chain) == 1]  # fmt: skip
    left = min(x0 for x0, _ in boxes) - MARGIN
    for item in layout.items.values():
        item.x -= left
    layout.clusters = {
        name: (x0 - left, y0, x1 - left, y1) for name, (x0, y0, x1, y1) in layout.clusters.items()
    }
    layout.width = max(x1 for _, x1 in boxes) - left + MARGIN


def _layout(drawn: Diagram) -> _Layout:
    """Where every node, dummy point and cluster goes."""
    group = {ref: name for name, members in drawn.clusters.items() for ref in members}
    ends = [ref for edge in drawn.edges for ref in (edge.source, edge.target)]
    keys = dict.fromkeys([*drawn.labels, *ends, *group])  # the start first: the walk's root
    pairs = _pairs(drawn)
    turned = _turned(list(keys), pairs)
    rank = _ranks(
        list(keys),
        [(t, s) if i in turned else (s, t) for i, (s, t) in enumerate(pairs) if s != t],
    )
    items: dict[str, _Item] = {}
    for key in keys:
        width, height = _node_size(drawn.labels.get(key, key), drawn.shapes.get(key, "box"))
        items[key] = _Item(key, rank[key], width, height, group.get(key, ""))
    routes = _routes(drawn, items, rank)
    rows = _initial_rows(items, routes)
    _order(rows, routes, items)
    _place_x(rows, routes, items)
    _straighten(rows, routes, items)
    layout = _Layout(list(keys), items, routes, {}, height=_place_y(rows, items))
    for name, members in drawn.clusters.items():
        inside = [items[ref] for ref in members if ref in items]
        if inside:
            layout.clusters[name] = _cluster_box(name, inside)
    _fit(layout)
    return layout


def _num(value: float) -> str:
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text


def _attr(value: str) -> str:
    return quoteattr(value, {"\n": "&#10;"})


def _ports(layout: _Layout, shapes: Mapping[str, str]) -> dict[tuple[int, int], float]:
    """Where each route leaves or enters a box, spread along its border by direction."""
    ends: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for index, route in enumerate(layout.routes):
        chain = route.chain
        if len(chain) > 1:
            ends.setdefault((chain[0], 1), []).append((layout.items[chain[1]].x, index))
            ends.setdefault((chain[-1], 0), []).append((layout.items[chain[-2]].x, index))
    ports: dict[tuple[int, int], float] = {}
    for (key, side), found in ends.items():
        found.sort()
        spread = 0.0
        if shapes.get(key, "box") == "box" and len(found) > 1:
            spread = min(layout.items[key].width / 2, 16.0 * (len(found) - 1))
        for i, (_, index) in enumerate(found):
            ports[index, side] = spread * (i / max(len(found) - 1, 1) - 0.5)
    return ports


def _points(index: int, layout: _Layout, ports: Mapping[tuple[int, int], float]) -> list[str]:
    """The route as cubic curves, vertical where they pass a point."""
    route, items = layout.routes[index], layout.items
    if len(route.chain) == 1:
        return []
    first, last = items[route.chain[0]], items[route.chain[-1]]
    points = [(first.x + ports[index, 1], first.y + first.height / 2)]
    for key, after in itertools.pairwise(route.chain[1:]):
        item = items[key]
        if not item.rank % 2:  # straight through a row of nodes
            points += [(item.x, item.top), (item.x, item.bottom)]
        elif abs((points[-1][0] + items[after].x) / 2 - item.x) > max(item.width / 2, 4.0):
            points.append((item.x, item.y))  # else a curve without it passes it anyway
    points.append((last.x + ports[index, 0], last.y - last.height / 2))
    if route.turned:
        points.reverse()
    path = [f"M{_num(points[0][0])},{_num(points[0][1])}"]
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        middle = _num((ay + by) / 2)
        path.append(f"C{_num(ax)},{middle} {_num(bx)},{middle} {_num(bx)},{_num(by)}")
    return path


def _loop(item: _Item) -> str:
    x, y = item.x + item.width / 2, item.y
    far, near = _num(x + 30), _num(x)
    return f"M{near},{_num(y - 6)}C{far},{_num(y - 24)} {far},{_num(y + 24)} {near},{_num(y + 6)}"


def _loop_label(route: _Route, item: _Item) -> tuple[float, float]:
    """Where a loop's label goes: right of the loop."""
    return item.x + item.width / 2 + 36 + _label_width(route.edge.label) / 2, item.y


def _edge(index: int, layout: _Layout, ports: Mapping[tuple[int, int], float], arrow: str) -> str:
    route = layout.routes[index]
    edge = route.edge
    d = "".join(_points(index, layout, ports)) or _loop(layout.items[route.chain[0]])
    dash = ' stroke-dasharray="5 4"' if edge.dashed else ""
    return (
        f'<path class="edge" data-source={_attr(edge.source)} data-target={_attr(edge.target)}'
        f' d="{d}" fill="none" stroke="{EDGE_COLOUR}" stroke-width="1.3"{dash}'
        f' marker-end="url(#{arrow})"/>'
    )


def _edge_label(route: _Route, layout: _Layout) -> str:
    if not route.edge.label:
        return ""
    item = layout.items[route.label or route.chain[0]]
    x, y = (item.x, item.y) if route.label else _loop_label(route, item)
    width = _label_width(route.edge.label)
    return (
        f'<rect x="{_num(x - width / 2)}" y="{_num(y - LABEL_HEIGHT / 2)}" width="{_num(width)}"'
        f' height="{_num(LABEL_HEIGHT)}" rx="3" fill="#ffffff" fill-opacity="0.9"/>'
        f'<text class="edge-label" x="{_num(x)}" y="{_num(y + 4)}" text-anchor="middle">'
        f"{escape(route.edge.label)}</text>"
    )


def _shape(shape: str, width: float, height: float, paint: str) -> str:
    w, h = _num(width / 2), _num(height / 2)
    if shape == "diamond":
        return f'<polygon points="0,-{h} {w},0 0,{h} -{w},0" {paint}/>'
    radius = height / 2 if shape == "round" else 6.0
    return (
        f'<rect x="-{w}" y="-{h}" width="{_num(width)}" height="{_num(height)}"'
        f' rx="{_num(radius)}" {paint}/>'
    )


def _node(ref: str, item: _Item, drawn: Diagram, status: str) -> str:
    fill, stroke = COLOURS.get(status, NEUTRAL)
    dash = ' stroke-dasharray="5 3"' if status == "SKIPPED" else ""
    paint = f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}'
    label = drawn.labels.get(ref, ref)
    lines = label.split("\n")
    top = -len(lines) * LINE / 2 + 12
    spans = "".join(
        f'<tspan x="0" y="{_num(top + i * LINE)}">{escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    title = f"{label}\nstatus: {status}" if status else label
    return (
        f'<g class="node" data-ref={_attr(ref)} data-status={_attr(status)}'
        f' transform="translate({_num(item.x)},{_num(item.y)})">'
        f"<title>{escape(title)}</title>"
        f"{_shape(drawn.shapes.get(ref, 'box'), item.width, item.height, paint)}"
        f'<text text-anchor="middle">{spans}</text></g>'
    )


def _cluster(name: str, box: tuple[float, float, float, float]) -> str:
    x0, y0, x1, y1 = box
    return (
        f'<rect class="cluster" data-graph={_attr(name)} x="{_num(x0)}" y="{_num(y0)}"'
        f' width="{_num(x1 - x0)}" height="{_num(y1 - y0)}" rx="8" fill="none"'
        f' stroke="#8a94a6" stroke-dasharray="6 4"/>'
    )


def _cluster_label(name: str, box: tuple[float, float, float, float]) -> str:
    """Bottom left, where no arrow ends; over the edges, so one passing leaves it readable."""
    text = f"{name}: artefacts"
    x, y = box[0] + CLUSTER_PAD, box[3] - LABEL_HEIGHT - 4
    return (
        f'<rect x="{_num(x - 3)}" y="{_num(y)}" width="{_num(_label_width(text))}"'
        f' height="{_num(LABEL_HEIGHT)}" rx="3" fill="#ffffff" fill-opacity="0.9"/>'
        f'<text class="cluster-label" x="{_num(x)}" y="{_num(y + 12)}">{escape(text)}</text>'
    )


def to_svg(definition: Definition, statuses: Mapping[str, str] | None = None) -> str:
    """The definition as a self-contained inline SVG, nodes coloured by ``statuses`` if given.

    Every node is a ``<g class="node" data-ref=... data-status=...>``, every edge a
    ``<path class="edge" data-source=... data-target=...>``, every GRAPH a
    ``<rect class="cluster">``, so a page can style or script them.
    """
    return _render(diagram(definition), statuses or {})


def _render(drawn: Diagram, statuses: Mapping[str, str]) -> str:
    layout = _layout(drawn)
    ports = _ports(layout, drawn.shapes)
    arrow = "arrow-" + re.sub(r"[^A-Za-z0-9_-]", "_", drawn.name)
    width, height = _num(layout.width), _num(layout.height)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}"'
        f' width="{width}" height="{height}" role="img" aria-label={_attr(drawn.name)}'
        f' class="graph">',
        f"<style>{STYLE}</style>",
        f'<defs><marker id="{arrow}" viewBox="0 0 10 8" refX="10" refY="4" markerWidth="10"'
        f' markerHeight="8" markerUnits="userSpaceOnUse" orient="auto">'
        f'<path d="M0,0L10,4L0,8z" fill="{EDGE_COLOUR}"/></marker></defs>',
    ]
    parts += [_cluster(name, box) for name, box in layout.clusters.items()]
    parts += [_edge(i, layout, ports, arrow) for i in range(len(layout.routes))]
    parts += [_edge_label(route, layout) for route in layout.routes]
    parts += [_cluster_label(name, box) for name, box in layout.clusters.items()]
    parts += [_node(ref, layout.items[ref], drawn, statuses.get(ref, "")) for ref in layout.nodes]
    parts.append("</svg>")
    return "\n".join(part for part in parts if part) + "\n"
