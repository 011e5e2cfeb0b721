"""The search space of ``train.py tune``: a YAML file keyed by the dotted names of ``fit``'s flags.

::

    model.optimizer.lr:         {type: float, low: 1.0e-4, high: 1.0, log: true}
    model.optimizer.class_path: {type: categorical, choices: [torch.optim.SGD, torch.optim.Adam]}
    model.l2:                   {type: float, low: 0.0, high: 1.0e-3}
    model.hidden_sizes:         {type: categorical, choices: [[32, 32], [64, 64]]}
    trainer.max_epochs:         {type: int, low: 5, high: 20, step: 5}

Types: ``float`` (``low``, ``high``, optional ``log`` or ``step``), ``int`` (the same; ``step``
default 1) and ``categorical`` (``choices``: any YAML values, lists included). This module
checks the file's own structure (`load_space`); whether each key is a flag of ``fit`` that
takes the values is checked against ``fit``'s parser by `fusedce.lightning_modules.tune`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainError

TYPES = ("float", "int", "categorical")
_FIELDS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}


def flag_value(value: Any) -> str:
    """``value`` as a command-line flag value that ``fit``'s parser reads back as ``value``.

    Floats keep a dot and a signed exponent (``1.0e-05``: YAML reads ``1e-05`` as a string),
    booleans and None are YAML words, lists and dicts are JSON.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            if "." not in mantissa:
                mantissa += ".0"
            if exponent[0] not in "+-":
                exponent = "+" + exponent
            text = f"{mantissa}e{exponent}"
        return text
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


@dataclass
class Param:
    """One key of the space.

    Attributes:
        key: The dotted flag name (``model.optimizer.lr``).
        type: ``float``, ``int`` or ``categorical``.
        low: Lower bound (float / int).
        high: Upper bound, inclusive (float / int).
        log: Sample on a log scale (float / int).
        step: Grid step (float / int; None for a continuous float).
        choices: The values of a categorical key.
    """

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)

    def encoded_choices(self) -> list[Any]:
        """The choices as optuna stores them: lists and dicts as their JSON text."""
        return [_encode(c) for c in self.choices]

    def decode(self, value: Any) -> Any:
        """The value of the flag for what optuna suggested (the inverse of `encoded_choices`)."""
        if self.type != "categorical":
            return value
        for choice in self.choices:
            if _encode(choice) == value:
                return choice
        return value

    def suggest(self, trial: Any) -> Any:
        """Draws this key's value for an optuna ``trial``."""
        if self.type == "categorical":
            return self.decode(trial.suggest_categorical(self.key, self.encoded_choices()))
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """The values the grid sampler visits (encoded as optuna stores them).

        Raises:
            TrainError: A float key without a ``step``.
        """
        if self.type == "categorical":
            return self.encoded_choices()
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise TrainError(
                f"space key {self.key}: the grid sampler needs a `step` for a float "
                "(or a categorical key)"
            )
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        return [self.low + i * self.step for i in range(n + 1)]

    def probes(self) -> Iterator[Any]:
        """Values to check against ``fit``'s parser: both bounds; of the choices, the
        smallest and largest number and every other value."""
        if self.type != "categorical":
            yield self.low
            yield self.high
            return
        numbers = [c for c in self.choices if _is_number(c)]
        if numbers:
            yield from dict.fromkeys([min(numbers), max(numbers)])
        yield from (c for c in self.choices if not _is_number(c))

    def spec(self) -> dict[str, Any]:
        """The key's specification as written in a space file (JSON-able)."""
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


# A number in exponent form without a dot (1e-4): YAML 1.1 (PyYAML) reads it as text.
_EXP_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(value: Any) -> Any:
    """``value``, or the float it spells where YAML read a number such as ``1e-4`` as text."""
    if isinstance(value, str) and _EXP_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _encode(choice: Any) -> Any:
    if choice is None or isinstance(choice, bool | int | float | str):
        return choice
    return json.dumps(choice)


def _number(key: str, name: str, value: Any, integer: bool) -> float | int:
    kinds = (int,) if integer else (int, float)
    value = _yaml_number(value)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TrainError(f"space key {key}: `{name}` must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise TrainError(f"space key {key}: `{name}` must be finite, got {value!r}")
    return value


def parse_param(key: Any, spec: Any) -> Param:
    """One key of the space file as a `Param`.

    Raises:
        TrainError: One line naming the key: not a mapping, an unknown type or field, a missing
            or non-numeric bound, ``low > high``, a ``log`` range that includes 0, ``log`` with
            ``step``, a step <= 0, no choices.
    """
    if not isinstance(key, str) or not key or key.startswith("-"):
        raise TrainError(f"space key {key!r}: expected a dotted flag name such as model.l2")
    if not isinstance(spec, dict):
        raise TrainError(f"space key {key}: expected a mapping such as {{type: float, low: ...}}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise TrainError(f"space key {key}: unknown type {kind!r} (one of: {', '.join(TYPES)})")
    unknown = sorted(set(spec) - set(_FIELDS[kind]))
    if unknown:
        raise TrainError(
            f"space key {key}: unknown field {unknown[0]!r} for type {kind} "
            f"(fields: {', '.join(_FIELDS[kind])})"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TrainError(f"space key {key}: `choices` must be a non-empty list")
        choices = [_yaml_number(c) for c in choices]
        encoded = [_encode(c) for c in choices]
        if len(set(map(json.dumps, encoded))) < len(encoded):
            raise TrainError(f"space key {key}: `choices` has a value twice")
        return Param(key, kind, choices=list(choices))
    integer = kind == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise TrainError(f"space key {key}: `{name}` is missing")
    low = _number(key, "low", spec["low"], integer)
    high = _number(key, "high", spec["high"], integer)
    if low > high:
        raise TrainError(f"space key {key}: low {low!r} > high {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise TrainError(f"space key {key}: `log` must be true or false, got {log!r}")
    if log and low <= 0:
        raise TrainError(f"space key {key}: a log range must be > 0, got low {low!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(key, "step", step, integer)
        if step <= 0:
            raise TrainError(f"space key {key}: `step` must be > 0, got {step!r}")
        if log:
            raise TrainError(f"space key {key}: `step` and `log` cannot be combined")
    if not integer:
        low, high = float(low), float(high)
        step = None if step is None else float(step)
    return Param(key, kind, low, high, log, step)


def load_space(path: str | Path) -> list[Param]:
    """Reads and checks a space file (structure only; see the module docstring).

    Returns:
        The keys in a fixed order: ``*.class_path`` keys first (a flag that picks a class must
        come before the flags of its arguments), then as written.

    Raises:
        TrainError: One line: the file is missing or not YAML, is not a mapping, or a key is
            bad (`parse_param`).
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"--tune.space {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise TrainError(f"--tune.space {path}: not valid YAML: {first}") from err
    if not isinstance(data, dict) or not data:
        raise TrainError(
            f"--tune.space {path}: expected a mapping of flag names to "
            "{type: float|int|categorical, ...}"
        )
    params = [parse_param(key, spec) for key, spec in data.items()]
    return sorted(params, key=lambda p: not p.key.endswith(".class_path"))


def space_spec(params: list[Param]) -> dict[str, Any]:
    """The space as a JSON-able mapping (stored with the study, to recognise it on resume)."""
    return {p.key: p.spec() for p in params}


def param_flags(params: list[Param], values: dict[str, Any]) -> list[str]:
    """``--key value`` flags for ``values`` (by key), in the order of ``params``."""
    flags: list[str] = []
    for p in params:
        if p.key in values:
            flags += [f"--{p.key}", flag_value(values[p.key])]
    return flags
