"""The plotting helper every report uses: matplotlib figures on an Agg canvas, without pyplot.

No display and no global state (pyplot keeps figures alive between calls and is not thread-safe),
so a report can be drawn in any worker. Importing this module is cheap: matplotlib is imported
by the functions that draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 100


def figure(width: float, height: float) -> Any:
    """A new figure of ``width`` x ``height`` inches, laid out by matplotlib's constrained layout.

    :param width: the width in inches.
    :param height: the height in inches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(drawn)  # Agg, without pyplot: no display, no global state
    return drawn


def stacked(width: float, height: float, rows: int = 1) -> tuple[Any, list[Any]]:
    """A new figure with ``rows`` axes stacked vertically, sharing the x axis.

    :param width: the width in inches.
    :param height: the height in inches.
    :param rows: how many axes.
    """
    drawn = figure(width, height)
    return drawn, list(drawn.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])


def save(drawn: Any, path: Path) -> Path:
    """Write a figure as a PNG file; returns the path.

    :param drawn: the figure.
    :param path: the PNG file.
    """
    drawn.savefig(path, dpi=DPI)
    return path


def embed_images(page: str, folder: Path) -> str:
    """A page with the PNG files it shows from ``folder`` inlined as ``data:`` URIs (the viewer's policy
    allows them), those files removed: one self-contained file, one upload, readable wherever it is opened
    (the lake's viewer, MLflow's artifact view, a download).

    :param page: the page's HTML, whose images are ``src="<name>.png"`` of files in ``folder``.
    :param folder: the report folder.
    :returns: the page; each inlined image keeps its name as ``data-plot="<name>"``.
    """
    import base64
    import re

    embedded: set[Path] = set()

    def inline(match: re.Match[str]) -> str:
        path = folder / match.group(1)
        if not path.is_file():
            return match.group(0)
        embedded.add(path)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{encoded}" data-plot="{path.stem}"'

    page = re.sub(r'src="([\w.\-]+\.png)"', inline, page)
    for path in embedded:
        path.unlink()
    return page


def plain(text: Any, limit: int | None = None) -> str:
    """Text for matplotlib: ``$`` escaped (a label never turns into broken mathtext), cut to ``limit`` characters.

    :param text: the text.
    :param limit: the most characters shown (an ellipsis ends a cut text), or None for all.
    """
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")
