"""bridge_ext's test and demo support, not part of the library: real Megatron-Core models on a
CPU-only machine (tiny Hugging Face models, their Megatron builds and forward), the models of
``bridge-ext demo`` and a torch_dist checkpoint writer. Installed from ``testing/`` by
scripts/install.sh, with the exact megatron-core / megatron-bridge versions it is written for.

Every patch of megatron or torch here is scoped to a block and undone on exit; docs/cpu_models.md.
"""
