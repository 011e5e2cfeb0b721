"""The sharded path of the losses: the vocabulary split by class over the ranks of a process
group (the implementation behind ``fusedce.vocab_parallel`` and the ``process_group`` / DTensor
arguments of the plain functions; see there and docs/VOCAB_PARALLEL.md).

Modules, bottom up (each imports only those before it, and none imports the plain functions):

* ``agreement``: the process group, this rank's slice (``Shard``) and the metadata exchange
  that makes the ranks agree (named int64 columns, fingerprints);
* ``slices``: the local maths on a slice (torch ops, or the row contract of ``fusedce.core``)
  and the combine across ranks (the all-reduces of the forward);
* ``arguments``: the checks of one rank's arguments;
* ``functions``: the two autograd Functions;
* ``dtensor``: DTensor arguments unwrapped, results rewrapped;
* ``route``: a call from its arguments to the Function; a group of one rank runs the plain
  implementation its caller passes in.

Beside them, the vocabulary-parallel forms of the other losses on the same process groups:
``token_log_probs`` (``fusedce.token_log_probs`` / ``linear_token_log_probs`` over the slices:
their checks, rows and head from ``fusedce.log_probs``, ``route``'s metadata row) and
``distillation`` (the distillation losses' slices, on the rows and checks of
``fusedce.distillation``).
"""
