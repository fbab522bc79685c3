"""Real Megatron-Core models on a CPU-only machine, for the demo and the tests (not the exporter).

Every patch of megatron or torch here is scoped to a block and undone on exit; docs/cpu_models.md.
"""
