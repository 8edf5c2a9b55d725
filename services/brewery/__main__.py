"""The brewery agent: ``python -m services.brewery`` (the drinks example's steps)."""

from typing import Any

from kapellmeister import TaskSpec, run_agent, task
from services.brewery import handlers as h

STEPS: list[TaskSpec[Any, Any]] = [
    task("brewery.malt", h.malt),
    task("brewery.hops", h.hops),
    task("brewery.mash", h.mash),
    task("brewery.boil", h.boil),
    task("brewery.dry_hop", h.dry_hop),
    task("brewery.bottle_beer", h.bottle_beer),
    task("brewery.harvest", h.harvest),
    task("brewery.crush", h.crush),
    task("brewery.ferment_wine", h.ferment_wine),
]


def main() -> None:
    run_agent(
        "brewery",
        STEPS,
        description="Beer and wine, step by step (the data-dependency example)",
    )


if __name__ == "__main__":
    main()
