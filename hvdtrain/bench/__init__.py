"""Benchmarks behind `hvdtrain bench ...`: each prints its figures and writes them as JSON."""
