"""Suites: the runner (methods × datasets × protocols × fractions × seeds), the results store, controlled
experiments and the paper view's comparability fields."""
