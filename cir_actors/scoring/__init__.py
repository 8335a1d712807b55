"""Scoring: the math-verify scorer and evaluation on benchmark files."""
