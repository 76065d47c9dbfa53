"""Benchmarks: dvmm against a peer measured in the same run, printed as ratios."""
