"""nnsight tracing layer: adapters, sites, statistics and probes on diffusers DiTs.

This is the only package of massact-nn that imports nnsight.
"""
