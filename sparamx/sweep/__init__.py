"""Sweeps: a grid of pipeline runs, one results row each, with plots and a summary.

``grid`` reads the sweep file and expands it into the plan (``experiments.csv``),
``results`` is the append-only ``results.csv``, ``runner`` runs the rows and
``report`` draws the plots and writes ``summary.md`` from the results.
``python -m sparamx.sweep SWEEP.yaml`` runs one (``sparamx sweep``).
"""
