"""Storage, torch-free: the atomic write, advisory locks, provenance, and the run folder's
append-only tables."""
