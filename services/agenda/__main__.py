"""The agenda agent: ``python -m services.agenda`` (the container entrypoint)."""

from kapellmeister import run_agent, task
from services.agenda.actors import ACTORS
from services.agenda.handlers import activity


def main() -> None:
    run_agent(
        "agenda",
        [task("agenda.activity", activity)],
        description="The agenda: what the user does at a given hour of the week",
        actors=ACTORS,
    )


if __name__ == "__main__":
    main()
