"""The conformance contract: one set of checks, one registry of tiny models (``registry.ENTRIES``)."""
