"""The training loop and what it trains: task heads, freezing, LoRA, the activation cache."""
