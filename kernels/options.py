"""The loss options, and one check per option shared by every entry point.

``cross_entropy``, ``CrossEntropyLoss``, ``linear_cross_entropy``, ``LinearCrossEntropyLoss``
and the vocabulary-parallel calls all validate their options here (their tensors in
``validation.py``), so that the same bad value gets the same message wherever it is passed
(``who`` names the caller in the message). The kernels' layout of the class weights, token
weights and class indices (``prepare_*``, ``index_target_for_kernels``) is here too.

The float options (``label_smoothing``, ``logit_scale``, ``softcap``, ``z_loss``) are checked
with comparisons only, which also trace under ``torch.compile``: a float that changes between
calls becomes symbolic there (a ``SymFloat``), and each comparison becomes a guard instead of
failing the trace. ``to_op_args`` / ``from_op_args`` carry the options across the custom ops'
boundary (the floats in ``float_options_tensor`` where they vary between compiled calls).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .validation import (  # noqa: F401 - re-exported: every check importable from here
    INDEX_DTYPES,
    check_class_index_dtype,
    check_class_weight,
    check_token_weight,
    check_token_weight_values,
)

REDUCTIONS = ("none", "mean", "sum")
ACCUMULATIONS = ("float32", "input")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = sys.float_info.max


@dataclass(frozen=True)
class LossOptions:
    """What the loss computes, beyond its tensors.

    Attributes:
        ignore_index: class index that contributes neither loss nor gradient (class indices).
        label_smoothing: amount in [0, 1] of uniform smoothing of the target distribution.
        reduction: "none", "mean" or "sum".
        logit_scale: s > 0; the loss sees z = s * x.
        softcap: c > 0 or None; then z = c * tanh(z / c) (after the scale).
        z_loss: lambda >= 0; each non-ignored element adds lambda * lse(z) ** 2.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: str = "mean"
    logit_scale: float = 1.0
    softcap: float | None = None
    z_loss: float = 0.0

    @property
    def transforms_logits(self) -> bool:
        """Whether z differs from x (a logit scale or a softcap)."""
        return self.logit_scale != 1.0 or self.softcap is not None

    @property
    def mean(self) -> bool:
        return self.reduction == "mean"

    @property
    def per_row(self) -> bool:
        """Whether the output keeps one loss per element (and backward one factor per row)."""
        return self.reduction == "none"


@dataclass(frozen=True, slots=True)
class CallOptions:
    """The keyword options of one call as the caller passed them: what the public functions and
    modules hand to the paths below them (with the tensors and ``process_group`` beside it).

    Nothing is checked here: each path checks them where its errors must be raised (the plain
    functions first thing; the sharded path inside its rank agreement, so that a bad value on
    one rank raises on every rank). ``loss_options`` is that check for the ``LossOptions``.

    Attributes:
        ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss: the loss
            options (``LossOptions``), unchecked.
        return_stats: also return the statistics.
        inplace_backward: ``cross_entropy``'s in-place gradient.
        chunk_size, accumulation: ``linear_cross_entropy``'s chunking.
    """

    ignore_index: object = -100
    label_smoothing: object = 0.0
    reduction: object = "mean"
    logit_scale: object = 1.0
    softcap: object = None
    z_loss: object = 0.0
    return_stats: object = False
    inplace_backward: object = False
    chunk_size: object = None
    accumulation: object = "float32"

    @classmethod
    def of_keywords(cls, keywords: dict[str, object]) -> CallOptions:
        """The options among a public function's parameters, as ``locals()`` holds them first
        thing in its body: the signature is then the only place a public function names an
        option (a field of this class), and each function passes what it takes."""
        return cls(**{k: keywords[k] for k in _CALL_FIELDS if k in keywords})

    @classmethod
    def of(cls, module: object) -> CallOptions:
        """The options a loss module holds as attributes of these names (those it has)."""
        held = vars(module)  # plain attributes; the class's own (properties) are read too
        kind = type(module)
        return cls(
            **{
                k: held[k] if k in held else getattr(module, k)
                for k in _CALL_FIELDS
                if k in held or hasattr(kind, k)
            }
        )

    @staticmethod
    def hold(module: object, keywords: dict[str, object], names: Sequence[str]) -> None:
        """The converse of ``of``: checks a loss module's options (its ``__init__``'s
        ``locals()``; the errors name its class) and sets those of ``names`` as its attributes,
        which ``of`` reads back in ``forward`` (a module changed after construction computes
        what it shows)."""
        who = type(module).__name__
        call = CallOptions.of_keywords(keywords)
        opts = call.head_options(who) if "chunk_size" in names else call.loss_options(who)
        checked = replace(call, **vars(opts), return_stats=bool(call.return_stats))
        for name in names:
            setattr(module, name, getattr(checked, name))

    @staticmethod
    def describe(module: object, names: Sequence[str]) -> str:
        """``name=value, ...`` of a loss module's option attributes, for its ``extra_repr``."""
        return ", ".join(f"{name}={getattr(module, name)!r}" for name in names)

    def loss_options(self, who: str) -> LossOptions:
        """The loss options, checked (``check_options`` then ``check_extras``)."""
        opts = check_options(who, self.ignore_index, self.label_smoothing, self.reduction)
        return check_extras(who, opts, self.logit_scale, self.softcap, self.z_loss)

    def head_options(self, who: str) -> LossOptions:
        """The loss options of the fused linear head, checked with its ``chunk_size`` and
        ``accumulation``."""
        opts = self.loss_options(who)
        check_chunk_size(who, self.chunk_size)
        check_accumulation(who, self.accumulation)
        return opts


_CALL_FIELDS = tuple(CallOptions.__dataclass_fields__)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the loss and of every accumulation: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_options(
    who: str, ignore_index: object, label_smoothing: object, reduction: object
) -> LossOptions:
    """Validates the three loss options; returns them as a ``LossOptions``.

    ``ignore_index=None`` means -100 in every entry point (torch's ``linear_cross_entropy``
    reads it so; its ``cross_entropy`` rejects None).

    Raises:
        ValueError, TypeError: naming the argument and the accepted values.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        kind = type(label_smoothing).__name__
        raise TypeError(f"{who}: label_smoothing must be a float in [0, 1], got {kind}")
    if not 0.0 <= label_smoothing <= 1.0:  # NaN fails too
        raise ValueError(f"{who}: label_smoothing must be in [0, 1]{_got(label_smoothing)}")
    if ignore_index is None:  # as torch's linear_cross_entropy: None means the default
        ignore_index = -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{who}: ignore_index must be an int or None, got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"{who}: ignore_index {ignore_index} does not fit in 64 bits")
    return LossOptions(int(ignore_index), float(label_smoothing), str(reduction))


def _positive_float(who: str, name: str, value: object, allow_zero: bool = False) -> float:
    kind = "a float >= 0" if allow_zero else "a float > 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be {kind}, got {type(value).__name__}")
    v = float(value)
    # Comparisons only (math.isfinite does not trace on a symbolic float); NaN fails them too.
    # The bound is the largest float, not inf: traced, `v < inf` is taken as always true.
    ok = (0.0 <= v <= _FLOAT_MAX) if allow_zero else (0.0 < v <= _FLOAT_MAX)
    if not ok:
        raise ValueError(f"{who}: {name} must be {kind}{_got(value)}")
    return v


def _got(value: object) -> str:
    """``", got <value>"`` for a message; nothing while torch.compile traces (a symbolic float
    cannot be formatted there: the error is then raised without the value)."""
    return "" if torch.compiler.is_compiling() else f", got {value}"


def check_extras(
    who: str,
    opts: LossOptions,
    logit_scale: object = 1.0,
    softcap: object = None,
    z_loss: object = 0.0,
) -> LossOptions:
    """Validates the logit transform and z-loss options; returns ``opts`` with them.

    Raises:
        TypeError: a non-number. ValueError: ``logit_scale <= 0``, ``softcap <= 0``,
            ``z_loss < 0``, or a non-finite value.
    """
    plain = (float, int)  # exact types: bool and tensors take the checks below
    if (
        softcap is None
        and type(logit_scale) in plain
        and logit_scale == 1.0
        and type(z_loss) in plain
        and z_loss == 0.0
    ):
        return opts  # the defaults (opts holds them): dataclasses.replace costs microseconds
    scale = _positive_float(who, "logit_scale", logit_scale)
    cap = None if softcap is None else _positive_float(who, "softcap", softcap)
    lam = _positive_float(who, "z_loss", z_loss, allow_zero=True)
    return replace(opts, logit_scale=scale, softcap=cap, z_loss=lam)


FLOAT_OPTIONS = ("label_smoothing", "logit_scale", "softcap", "z_loss")


def has_float_options(opts: LossOptions) -> bool:
    """Whether any float option differs from its default."""
    return (
        opts.label_smoothing != 0.0
        or opts.logit_scale != 1.0
        or opts.softcap is not None
        or opts.z_loss != 0.0
    )


def float_options_tensor(opts: LossOptions) -> Tensor:
    """The float options as a (4,) float64 CPU tensor (``FLOAT_OPTIONS`` in order; softcap 0
    for None), for the custom ops under ``torch.compile``.

    A float argument of a custom op is specialised by torch.compile: every value that changes
    between calls (a z-loss or softcap schedule) would compile a graph of its own, up to the
    recompile limit. Built from tensor arithmetic instead, a changing float stays symbolic (torch
    turns it into a graph input) and one graph serves every value. Reading the tensor on the CPU
    costs no device sync.
    """
    one = torch.ones((), dtype=torch.float64)
    cap = 0.0 if opts.softcap is None else opts.softcap
    return torch.stack(
        [one * opts.label_smoothing, one * opts.logit_scale, one * cap, one * opts.z_loss]
    )


def to_op_args(opts: LossOptions, as_tensor: bool) -> dict[str, object]:
    """``opts`` as the custom ops' keyword arguments: ``ignore_index``, ``label_smoothing``,
    ``reduction``, ``logit_scale``, ``softcap``, ``z_loss`` and ``float_options``
    (``from_op_args`` reads them back inside the op).

    With ``as_tensor``: the float values travel in ``float_options_tensor`` and the four floats
    are NaN placeholders (softcap stays None where it is None: the op reads which logit
    transform applies from it); else the floats themselves and ``float_options=None``.
    """
    if not as_tensor:
        floats = (opts.label_smoothing, opts.logit_scale, opts.softcap, opts.z_loss, None)
    else:
        nan = float("nan")
        cap = None if opts.softcap is None else nan
        floats = (nan, nan, cap, nan, float_options_tensor(opts))
    smoothing, scale, softcap, lam, float_options = floats
    return {
        "ignore_index": opts.ignore_index,
        "label_smoothing": smoothing,
        "reduction": opts.reduction,
        "logit_scale": scale,
        "softcap": softcap,
        "z_loss": lam,
        "float_options": float_options,
    }


def from_op_args(
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    logit_scale: float,
    softcap: float | None,
    z_loss: float,
    float_options: Tensor | None,
) -> LossOptions:
    """The ``LossOptions`` of a custom op's arguments (``to_op_args``): the float options read
    from ``float_options`` where given, else the floats themselves."""
    opts = LossOptions(ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss)
    if float_options is None:
        return opts
    smoothing, scale, cap, lam = float_options.tolist()
    softcap = None if opts.softcap is None else cap
    return replace(opts, label_smoothing=smoothing, logit_scale=scale, softcap=softcap, z_loss=lam)


def prepare_token_weight(token_weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Token weights as the kernels read them: (M,) contiguous, in the accumulation dtype."""
    if token_weight is None:
        return None
    return token_weight.detach().reshape(-1).to(accumulation_dtype(dtype)).contiguous()


def check_chunk_size(who: str, chunk_size: object) -> None:
    """``chunk_size`` is None or an int >= 1 (bool is rejected: ``True`` is not a size)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{who}: chunk_size must be a positive int or None, got {chunk_size!r}")


def check_accumulation(who: str, accumulation: object) -> None:
    if accumulation not in ACCUMULATIONS:
        raise ValueError(
            f"{who}: accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}"
        )


def prepare_class_weight(weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The class weights as the kernels read them: contiguous, in the accumulation dtype."""
    if weight is None:
        return None
    return weight.detach().to(accumulation_dtype(dtype)).contiguous()


def index_target_for_kernels(target: Tensor, ignore_index: int) -> Tensor:
    """Class indices in a dtype the kernels compare with ``ignore_index`` without wrapping.

    int32 targets stay int32 (half the bytes) when ``ignore_index`` fits in int32; otherwise,
    and for uint8, they are widened to int64 so that the comparison is done in 64 bits.
    """
    if target.dtype == torch.int64:
        return target
    if target.dtype == torch.int32 and -(2**31) <= ignore_index < 2**31:
        return target
    return target.long()


def check_temperature(who: str, temperature: object) -> float:
    """``temperature`` as a float in (0, inf): the softmax of logits / T.

    Raises:
        TypeError: not an int or float (a bool is not a temperature).
        ValueError: 0, negative, infinite or NaN; the message names ``who``.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{who}: temperature must be a float > 0, got {type(temperature).__name__}")
    t = float(temperature)
    # Comparisons only: they trace under torch.compile (NaN fails them too).
    if not 0.0 < t <= _FLOAT_MAX:
        raise ValueError(f"{who}: temperature must be a finite float > 0{_got(temperature)}")
    return t


def check_flag(who: str, name: str, value: object) -> bool:
    """``value`` (the argument ``name``) is a bool; raises TypeError naming ``who``."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be a bool, got {type(value).__name__}")
    return value
