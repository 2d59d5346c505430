"""Evaluation: held-out loss and synthetic long-context retrieval."""
