"""The distillation losses, ``fusedce.distillation_loss`` and ``fusedce.linear_distillation_loss``
(definitions and gradients in docs/DISTILLATION.md).

Modules, bottom up (each imports only those before it):

* ``options``: ``DistillOptions`` and the check of the keyword options;
* ``teacher``: the teacher's tensors as rows (``Teacher``) and a dense teacher head;
* ``value_checks``: the teacher's ids and mass and the target's class indices, counted on the
  device (deferred on CUDA);
* ``core``: the row contract on a backend (``backends/torch_distill.py``,
  ``backends/triton_distill.py``), the mean, the forward pass and the fused head's chunk loop;
* ``checks``: the argument checks of the public functions;
* ``functions``: the eager autograd Functions;
* ``custom_ops``: the ``fusedce::`` custom ops, their fakes and autograd formulas;
* ``api``: the two public functions.

The vocabulary-parallel form is ``fusedce.sharded.distillation``. Nothing is imported here: the
backends import ``options`` and ``teacher`` below the rest of the package.
"""
