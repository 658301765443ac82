"""Benchmarks of vaelib and the book: scripts that measure and write JSON records.

Run each as ``python -m benchmarks.NAME --help`` from the repository root; see
``benchmarks/README.md`` for what each measures and the targets.
"""
