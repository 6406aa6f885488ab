"""Benchmark protocols (importing this registers the built-ins)."""
