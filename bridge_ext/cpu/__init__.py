"""Run real Megatron-Core models on a CPU-only machine (tests, the demo, CPU users).

Nothing here replaces a GPU kernel when the real one is present.
"""
