"""Data: prompts and benchmark loading, the synthetic tasks, and the locally built tiny model."""
