"""Implementations of the ports: each module here is the only importer of its client library."""
