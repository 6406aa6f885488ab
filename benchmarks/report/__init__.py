"""Reports from stored results: headline and detailed tables, plots and the self-contained HTML report."""
