"""Benchmark scripts: each writes a JSON result (with provenance) under reports/; plot.py draws them
(figures.py) and writes reports/README.md (readme_sections.py).

Run them from the repository root as modules, e.g. ``python -m bench.nll``.
"""
