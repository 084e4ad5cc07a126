"""Metrics, decoding and scoring of the evaluation and probe stages (torch side)."""
