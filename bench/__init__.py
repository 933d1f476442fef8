"""Benchmarks for dicom-node (run from the repository root, e.g. ``python -m bench.ingest``).

Benchmarks measure; they never assert on timings. See ``bench/README.md``.
"""
