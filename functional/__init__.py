"""Functional tests: real namespaces, keepalived and conntrackd (root only)."""
