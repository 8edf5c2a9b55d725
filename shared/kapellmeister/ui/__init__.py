"""The web UI and its drawing of a definition as SVG (`to_svg`)."""

from kapellmeister.ui.svg import to_svg

__all__ = ["to_svg"]
