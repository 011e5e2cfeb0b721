"""The vocabulary-parallel benchmark's parts; ``benchmarks/bench_vocab_parallel.py`` is its
command line.

* ``counting``: the shim around the ``torch.distributed`` collectives, the profiler's record of
  the process group's calls, and the documented byte formulas they are checked against;
* ``worker``: one process per rank: the three paths to the loss, each (N, V) cell counted and
  timed, and the spawning of the ranks;
* ``report``: one row per (W, N, V) from the ranks' records, the markdown and the plot.
"""
