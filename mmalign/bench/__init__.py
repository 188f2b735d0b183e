"""Benchmarks run through `mmalign bench NAME`; each reports ratios or comparisons measured in the same run."""
