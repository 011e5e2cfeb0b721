"""The cross-entropy benchmark's parts; ``benchmarks/bench_cross_entropy.py`` is its command line.

* ``sweep``: the cells (mode, dtype, N, V) and their order;
* ``providers``: fusedce and its variants, torch eager, torch.compile, Liger;
* ``accuracy``: the float64 references and the errors against them;
* ``cell``: one cell: inputs, the copy floor, every provider checked, measured and timed;
* ``budget``: the time budget and the stop on SIGTERM;
* ``report``: markdown tables, JSON and the GB/s plot.
"""
