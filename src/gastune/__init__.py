"""gastune: sparse parameter-efficient fine-tuning with GAST and its baselines."""

__version__ = "0.1.0"
