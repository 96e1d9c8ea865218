"""Developer tools: tiny offline checkpoints, scripted raters, the memory counter, and the benchmarks."""
