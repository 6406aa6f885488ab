"""Metrics and statistics as pure functions: Dice definitions, bootstrap intervals, paired tests."""
