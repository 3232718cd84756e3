"""Per-matrix sparsity: uniform, an ordered rules file, or a depth schedule.

A rules file (YAML or JSON) maps name patterns to sparsities, first match wins::

    # keep the attention output dense, prune the MLP down projection harder
    "*.self_attn.o_proj.weight": 0.0
    "re:.*layers\\.(0|1)\\..*": 0.3
    "*.mlp.down_proj.weight": 0.6

A pattern is a shell glob over the checkpoint tensor name, or a regular expression after ``re:``
(matched against the whole name). It may also be a list of ``{match: PATTERN, sparsity: S}``.
Matrices no rule matches take the base sparsity, or the depth schedule when one is given.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import LlmpruneError


@dataclass(frozen=True)
class Matrix:
    """A prunable matrix as ratio assignment sees it."""
    name: str  # checkpoint tensor name
    numel: int
    layer: int | None  # decoder layer index; None outside the decoder layers (a vision tower's linears)


@dataclass(frozen=True)
class Rule:
    pattern: str
    sparsity: float

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def check_sparsity(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LlmpruneError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def load_rules(path: str | Path) -> list[Rule]:
    """Parse a rules file into ordered rules; any structural problem is a one-line error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise LlmpruneError(f"cannot read ratio file {path}: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise LlmpruneError(f"ratio file {path} does not parse: {_parse_error(err)}") from None
    if data is None:  # an empty file or one holding only comments
        data = {}
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list) and all(isinstance(r, dict) and set(r) == {"match", "sparsity"} for r in data):
        pairs = [(r["match"], r["sparsity"]) for r in data]
    else:
        raise LlmpruneError(
            f"ratio file {path} must map name patterns to sparsities, or list {{match, sparsity}} rules"
        )
    rules = []
    for pattern, value in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise LlmpruneError(f"ratio file {path}: rule pattern {pattern!r} is not a string")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise LlmpruneError(f"ratio file {path}: bad regular expression {pattern!r}: {err}") from None
        rules.append(Rule(pattern, check_sparsity(value, f"ratio file {path}: sparsity for {pattern!r}")))
    if not rules:
        raise LlmpruneError(f"ratio file {path} has no rules")
    return rules


def _parse_error(err: Exception) -> str:
    """A YAML or JSON parse error in one line, with the line and column where it was found."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:  # YAML: 0-based line and column of the problem
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    return str(err).strip().splitlines()[0]


def parse_schedule(text: str) -> float:
    """'linear:0.2' -> 0.2, the spread between the last and the first decoder layer."""
    kind, _, value = text.partition(":")
    try:
        spread = float(value)
    except ValueError:
        spread = None
    if kind != "linear" or spread is None or not 0 <= spread < 1:
        raise LlmpruneError(f"malformed schedule {text!r}: expected linear:SPREAD with 0 <= SPREAD < 1, e.g. linear:0.2")
    return spread


def linear_schedule(matrices: list[Matrix], mean: float, spread: float) -> dict[str, float]:
    """Sparsity rising linearly with depth by ``spread`` in all, parameter-weighted mean ``mean``.

    Layer ratios are base + spread * (t - 1/2) with t from 0 (first layer) to 1 (last), shifted so
    that the parameter-weighted mean is exact (``centred``).
    """
    if not matrices:
        return {}
    last = max(m.layer for m in matrices)
    return centred(matrices, mean, {m.name: spread * ((m.layer / last if last else 0.5) - 0.5) for m in matrices})


def centred(matrices: list[Matrix], mean: float, offsets: dict[str, float]) -> dict[str, float]:
    """``mean + shift + offsets[name]`` per matrix, clipped to [0, 0.99], with the one shift that makes
    the parameter-weighted mean exactly ``mean`` (bisection, so clipping does not move the mean)."""
    if not matrices:
        return {}
    total = sum(m.numel for m in matrices)

    def ratios(shift: float) -> dict[str, float]:
        return {m.name: min(max(mean + shift + offsets[m.name], 0.0), 0.99) for m in matrices}

    def weighted(shift: float) -> float:
        r = ratios(shift)
        return sum(r[m.name] * m.numel for m in matrices) / total

    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weighted(mid) < mean else (lo, mid)
    return ratios((lo + hi) / 2)


def assign(matrices: list[Matrix], sparsity: float, rules: list[Rule] | None = None,
           schedule: float | None = None, rules_source: str = "ratio file") -> dict[str, float]:
    """Sparsity for every prunable matrix: first matching rule, else schedule, else uniform.
    Matrices outside the decoder layers (``layer`` None) follow the rules, else the uniform sparsity.

    A rule that matches no matrix is an error: it is almost always a typo.
    """
    rules = rules or []
    chosen: dict[str, float] = {}
    used = [False] * len(rules)
    rest = []
    for m in matrices:
        for i, rule in enumerate(rules):
            if rule.matches(m.name):
                chosen[m.name] = rule.sparsity
                used[i] = True
                break
        else:
            rest.append(m)
    unused = [r.pattern for r, u in zip(rules, used) if not u]
    if unused:
        raise LlmpruneError(f"{rules_source}: rule {unused[0]!r} matches no prunable matrix")
    if schedule:
        chosen.update(linear_schedule([m for m in rest if m.layer is not None], sparsity, schedule))
    chosen.update({m.name: sparsity for m in rest if m.name not in chosen})
    return chosen


def owl(matrices: list[Matrix], sparsity: float, outlier_ratios: list[float], lam: float) -> dict[str, float]:
    """OWL (Yin et al., 2024): layers with more outliers are pruned less.

    Each layer's outlier ratio is min-max scaled to [0, 2 * lam]; its sparsity is ``sparsity``
    minus that value plus the parameter-weighted mean of the scaled values, so layers span
    ``sparsity`` +/- ``lam`` and the parameter-weighted mean stays ``sparsity``.
    """
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam if hi > lo else 0.0 for r in outlier_ratios]
    numel = [0] * len(outlier_ratios)
    for m in matrices:
        numel[m.layer] += m.numel
    centre = sum(s * n for s, n in zip(scaled, numel)) / sum(numel)
    layer_sparsity = [min(max(sparsity - s + centre, 0.0), 0.99) for s in scaled]
    return {m.name: layer_sparsity[m.layer] for m in matrices}
