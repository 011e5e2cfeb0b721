"""Vocabulary-parallel cross-entropy and linear head over ``torch.distributed``.

With tensor parallelism the output layer is split by vocabulary rows: rank r holds the logits (or
the weight rows) of a contiguous class range [start_r, start_r + V_r), the ranges in rank order
and of any sizes. These functions compute the loss of the full vocabulary from the slices without
gathering them:

* ``vocab_parallel_cross_entropy(local_logits, target, ...)``: logits (N, V_r) (or (C_r,),
  (N, C_r, d1, ...)), or a ``DTensor`` sharded on the class dimension of a 1-D mesh;
* ``vocab_parallel_linear_cross_entropy(input, local_weight, target, ...)``: replicated hidden
  states (..., D) and the weight rows (V_r, D) of this rank (or a (V, D) ``DTensor`` sharded by
  rows), chunked over the token rows.

Both take the one-pass extras of the plain functions (logit scale, softcap, z-loss, token
weights, ``return_stats``) with the same definitions over the global vocabulary.

Per call: one ``all_gather`` of a few int64 per rank (the slice sizes, ``vocab_start`` /
``vocab_size`` where given, and a fingerprint of the arguments -- shapes, options, the class
indices, the token and class weights -- so that a bad or mismatched input makes EVERY rank raise
the same exception instead of leaving some rank waiting in a collective; skipped only when the
sizes are given and the checks are off, ``set_target_check(False)``); then two
``all_reduce`` of O(N) floats in forward (the row maxima; one stacked buffer of the sums of
exponentials, the target terms, the probability mass of the target coefficients and, with
``return_stats``, the entropy and argmax terms), none in
backward for the cross-entropy, and one of the input gradient (N, D) in the backward of the
linear head. Nothing sent depends on V.

The local math of the common case -- class indices, with or without class weights, logit
scale, softcap, z-loss and token weights, but no label smoothing and no ``return_stats`` --
runs on the row contract of ``fusedce.core`` (``core.run_rows``: the fused Triton kernel on
GPUs and under ``TRITON_INTERPRET=1``, the torch backend on the CPU): one forward launch per
slice treats the slice as a whole row (targets elsewhere ignored) and gives the slice's max,
log-sum and, where the slice holds the target, the loss, which combine across ranks as partial
sums relative to the global max; one gradient-only launch reads back the GLOBAL max, log-sum
and lse coefficient and writes exactly this slice of the global gradient
(``fusedce.sharded.slices``). Everything is shift-exact: sums are exchanged relative to the row
max, and the gradient reads exp((z - max) - log_sum), never exp(z - lse). Everything else
(smoothing over the global V, probability targets, the statistics' global argmax) uses torch ops
in float32 (float64 for float64 input), in row chunks. The communication is the same either way.

Where the code lives: ``api`` here holds the two entry points (a group of one rank runs the
plain functions); the sharded path is the package ``fusedce.sharded`` (rank agreement, slice
maths, autograd Functions, DTensor, the calls), which never imports the plain functions.
"""

# The routing helpers of the plain functions and the process-group check stay importable from
# here (explicit re-exports); ``__all__`` names the two entry points.
from ..sharded.agreement import check_process_group as check_process_group
from ..sharded.route import refuse_unsharded_options as refuse_unsharded_options
from ..sharded.route import wants_vocab_parallel as wants_vocab_parallel
from .api import call_cross_entropy as call_cross_entropy
from .api import call_linear_cross_entropy as call_linear_cross_entropy
from .api import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
