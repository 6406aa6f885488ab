"""Reference protocols: reproductions of the official evaluation code of MGCA, BenchX, GTGM and CREMI, each
on the shared kit."""
