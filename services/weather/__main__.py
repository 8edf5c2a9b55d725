"""The weather agent: ``python -m services.weather`` (the container entrypoint)."""

from kapellmeister import run_agent, task
from services.weather.handlers import report


def main() -> None:
    run_agent(
        "weather",
        [task("weather.report", report)],
        description="The weather expert: a repeatable seasonal report for a date",
    )


if __name__ == "__main__":
    main()
