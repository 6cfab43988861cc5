"""U-Flow training, evaluation and export (needs the `train` extra: torch, timm, FrEIA)."""
