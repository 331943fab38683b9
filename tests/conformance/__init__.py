"""Conformance: every broker and store passes the same checks, unchanged."""
