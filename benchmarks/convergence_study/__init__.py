"""The convergence study behind benchmarks/convergence.py (design and cost: docs/convergence.md)."""
