"""The conductor's compiled definitions, by name and version.

A running workflow keeps the version it started with, so every version stays loaded;
``conductor.start.<name>`` takes the latest unless the ``Workflow-Version`` header names one.
"""

from __future__ import annotations

from collections.abc import Iterable

from kapellmeister.definitions import Definition
from kapellmeister.errors import DefinitionNotFound

__all__ = ["Registry"]


class Registry:
    """Definitions by ``(name, version)``."""

    def __init__(self, definitions: Iterable[Definition] = ()) -> None:
        self._versions: dict[str, dict[int, Definition]] = {}
        for definition in definitions:
            self.add(definition)

    def add(self, definition: Definition) -> None:
        self._versions.setdefault(definition.name, {})[definition.version] = definition

    def get(self, name: str, version: int | None = None) -> Definition:
        """The definition ``name`` at ``version`` (default: the latest).

        Raises:
            DefinitionNotFound: no such name, or no such version of it.
        """
        versions = self._versions.get(name)
        if not versions:
            raise DefinitionNotFound(f"no workflow definition named {name!r}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            raise DefinitionNotFound(f"{name!r} has no version {version} (known: {known})")
        return versions[version]

    def names(self) -> list[str]:
        return sorted(self._versions)
