"""Measurements: spectrum metrics (pure tensor math), the sites probes read and the probes that feed
the metrics from forward hooks, downstream evaluations (ICL, induction, functional rank, weight
spectra), KV-cache headroom and the geometry of W_K's update. Nothing here writes files or draws;
the run and the analyzer decide where results go."""
