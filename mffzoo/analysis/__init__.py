"""Analyses behind the paper's claims: latent frequency content, robustness to filtered inputs, fusion weights,
and the MAE-vs-MFF reproduction that runs them (reproduce)."""
