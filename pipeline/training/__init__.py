"""Training and scoring: the training loop, robustness protocols, evaluation at missing rates,
DDP plumbing, the frozen-text cache, and the commands that use a finished run (predict, export)."""
