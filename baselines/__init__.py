"""Baselines the latent bridge is compared with (one module per ``method``)."""
