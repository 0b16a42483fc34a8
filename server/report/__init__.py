"""The run report (``report.html``): one self-contained page written from a run directory alone.

``render.py`` assembles the page from ``sections.py`` (one function per section) and ``markup.py`` (escaped
HTML pieces, path scrubbing); ``data.py`` reads the run directory (metrics, checkpoints, manifests);
``recon.py`` shows the MAE's reconstructions of synthetic phantoms; ``cross_site.py`` and ``experiment.py``
are the optional sections; ``plots.py`` draws the figures (matplotlib, embedded as PNG data URIs). docs/report.md
describes the page.
"""

from server.report.render import render_report

__all__ = ["render_report"]
