"""matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn.

Importing pyplot costs about half a second; commands that only import a module for its other functions
(progress output, model instructions) never pay it.
"""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (plots go to files; no display is needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
