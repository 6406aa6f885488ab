"""The performance benchmark (``make perf``): ratios measured in one run; not part of the installed package."""
