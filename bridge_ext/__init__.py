"""bridge_ext: clean Hugging Face weights and PEFT adapters out of Megatron-Core models."""

from bridge_ext import compat

compat.install()  # before anything imports megatron: see bridge_ext/compat.py

__version__ = "0.1.0"
