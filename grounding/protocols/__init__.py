"""Evaluation protocols that run an entry point over several datasets (ODinW-13)."""
