"""Helpers of tools/bench.py: kit data and splits, quantization runners, measurement, report."""
