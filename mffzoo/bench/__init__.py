"""Benchmarks behind ``mffzoo bench``: each measures a named peer in the same process and reports ratios."""
