"""Data sources, task datasets and batching."""
