"""The model and its optimizers: the seed's GPT, the chunked attention-logit loop every
measurement shares, and optimizers by parameter role (Muon with any grouping of Q, K, V, O)."""
