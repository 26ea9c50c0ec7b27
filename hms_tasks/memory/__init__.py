"""Memory: tiered GC triggers that keep every worker pool child within its budget, a periodic
sweep of every child of every node, and on-demand tracemalloc comparisons to find a leak."""
