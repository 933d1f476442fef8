"""Synthetic DICOM data for the demo, tests and benchmarks (no real patients)."""
