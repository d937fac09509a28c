"""Benchmarks of bbb (issue 8). The engine lives in :mod:`bbb.bench`; these are thin wrappers."""
