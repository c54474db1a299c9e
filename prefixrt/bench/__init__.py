"""Benchmark workloads behind ``prefixrt bench`` (the top floor: they use everything below)."""
