"""Benchmark history: runs, rank statistics, change points, compare, trend and the HTML report. No torch."""
