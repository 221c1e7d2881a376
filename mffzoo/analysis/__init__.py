"""Analyses behind the paper's claims: latent frequency content, robustness to filtered inputs, fusion weights."""
