"""Measurements: spectrum metrics (pure tensor math), probes that feed them from forward hooks,
downstream evaluations, KV-cache headroom and the geometry of W_K's update. Nothing here writes
files or draws; the run and the analyzer decide where results go."""
