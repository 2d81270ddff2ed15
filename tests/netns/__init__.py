"""Kernel tests in real network namespaces, and the test bed they share (bed.py)."""
