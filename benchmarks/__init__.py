"""The benchmark scripts; each is run as ``python benchmarks/<name>.py``, and ``run_all.py`` imports
their measuring functions from here."""
