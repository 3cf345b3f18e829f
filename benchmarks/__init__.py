"""The benchmark scripts; ``benchmarks.gridlib`` is the grid's package (``benchmarks/grid.py`` its command line)."""
