"""Moved: the DeepSeek family's conformance is entries of the contract (tests/conformance/registry.py).

This module only re-exports the helpers tests/test_conformance_frontier.py imports from here;
it goes when that module joins the contract (docs/adding_an_architecture.md).
"""

from conformance.support import hf_base_model, input_ids, source_tensors

__all__ = ["hf_base_model", "input_ids", "source_tensors"]
