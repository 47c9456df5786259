"""Eval engines, tasks and scorers."""
