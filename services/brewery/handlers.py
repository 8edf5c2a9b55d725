"""The brewery's steps (the task-graph seed's drinks example): beer and wine.

Each handler takes the artefacts its task requires and returns the ones it produces;
the GRAPH in ``drinks.yaml`` decides what runs, in what order and in parallel. The
results are descriptions, the same for the same inputs.
"""

from __future__ import annotations

import msgspec


class Order(msgspec.Struct, frozen=True):
    drink: str
    style: str


class OrderIn(msgspec.Struct, frozen=True):
    order: Order


class Malt(msgspec.Struct, frozen=True):
    malt: str


class Hops(msgspec.Struct, frozen=True):
    hops: str


class Wort(msgspec.Struct, frozen=True):
    wort: str


class BoilIn(msgspec.Struct, frozen=True):
    wort: str
    hops: str


class YoungBeer(msgspec.Struct, frozen=True):
    young_beer: str


class DryHopIn(msgspec.Struct, frozen=True):
    young_beer: str
    order: Order


class DryHopped(msgspec.Struct, frozen=True):
    dry_hopped: str


class BottleIn(msgspec.Struct, frozen=True):
    young_beer: str
    dry_hopped: str | None = None


class Beer(msgspec.Struct, frozen=True):
    beer: str


class Grapes(msgspec.Struct, frozen=True):
    grapes: str


class Must(msgspec.Struct, frozen=True):
    must: str


class Wine(msgspec.Struct, frozen=True):
    wine: str


async def malt(req: OrderIn) -> Malt:
    """Malt the barley for the style."""
    return Malt(malt=f"{'pale' if req.order.style.upper() in {'IPA', 'LAGER'} else 'dark'} malt")


async def hops(req: OrderIn) -> Hops:
    """Prepare the hops for the style."""
    return Hops(hops="citra" if req.order.style.upper() == "IPA" else "saaz")


async def mash(req: Malt) -> Wort:
    """Mash the malt into wort."""
    return Wort(wort=f"wort of {req.malt}")


async def boil(req: BoilIn) -> YoungBeer:
    """Boil the wort with the hops, and ferment it."""
    return YoungBeer(young_beer=f"{req.wort} boiled with {req.hops}, fermented")


async def dry_hop(req: DryHopIn) -> DryHopped:
    """Dry-hop the young beer (an IPA's step)."""
    return DryHopped(dry_hopped=f"{req.young_beer}, dry-hopped for the {req.order.style}")


async def bottle_beer(req: BottleIn) -> Beer:
    """Bottle the beer, dry-hopped if it was."""
    return Beer(beer=f"bottled: {req.dry_hopped or req.young_beer}")


async def harvest(req: OrderIn) -> Grapes:
    """Harvest the grapes for the style."""
    return Grapes(grapes=f"{req.order.style} grapes")


async def crush(req: Grapes) -> Must:
    """Crush the grapes into must."""
    return Must(must=f"must of {req.grapes}")


async def ferment_wine(req: Must) -> Wine:
    """Ferment the must into wine."""
    return Wine(wine=f"wine from {req.must}")
