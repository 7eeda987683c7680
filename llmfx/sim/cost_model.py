"""A parametric step-time model: ScheduledBatch -> seconds, fit by least squares, stored as JSON.

    step_time = c0 + c_tok * prefill_tokens + c_seq * decode_seqs + c_ctx * context_tokens

- prefill_tokens: tokens of sequences fed more than one token this step (prompt chunks)
- decode_seqs: sequences fed exactly one token (decode steps, and one-token tail chunks)
- context_tokens: sum over sequences of start_pos + tokens fed (the KV that attention reads)

c0 is the fixed cost of a step (weight reads at small batch, launch overhead), c_tok the compute
of one prefill token, c_seq the per-sequence overhead, c_ctx one token of KV read. All in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmfx.scheduler import ScheduledBatch

COEFFICIENTS = ("c0", "c_tok", "c_seq", "c_ctx")
FORMAT = "llmfx-cost-model"


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchShape:
    """The features of one step that the cost model reads."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0

    @staticmethod
    def of(batch: ScheduledBatch) -> BatchShape:
        """The shape of a scheduled batch."""
        prefill = decode = context = 0
        for s in batch.seqs:
            n = len(s.token_ids)
            if n == 1:
                decode += 1
            else:
                prefill += n
            context += s.start_pos + n
        return BatchShape(prefill_tokens=prefill, decode_seqs=decode, context_tokens=context)

    def features(self) -> tuple[float, float, float, float]:
        """The regressors, in the order of COEFFICIENTS."""
        return (1.0, float(self.prefill_tokens), float(self.decode_seqs), float(self.context_tokens))


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """step_time = c0 + c_tok * prefill_tokens + c_seq * decode_seqs + c_ctx * context_tokens (seconds)."""

    c0: float
    c_tok: float = 0.0
    c_seq: float = 0.0
    c_ctx: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # source, model, gpu, points...

    def __post_init__(self) -> None:
        for name in COEFFICIENTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"CostModel.{name} must be a finite number >= 0 (seconds), got {v!r}")
        if self.c0 + self.c_tok + self.c_seq + self.c_ctx <= 0:
            raise ValueError("CostModel: at least one coefficient must be > 0, or every step would take no time")
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @staticmethod
    def constant(seconds: float) -> CostModel:
        """Every non-empty step takes the same time (useful to count steps)."""
        return CostModel(c0=seconds, meta={"source": "constant"})

    def step_time(self, batch: ScheduledBatch | BatchShape) -> float:
        """Seconds one step takes; an empty batch runs no model and takes 0."""
        shape = BatchShape.of(batch) if isinstance(batch, ScheduledBatch) else batch
        if shape.prefill_tokens == 0 and shape.decode_seqs == 0:
            return 0.0
        return (self.c0 + self.c_tok * shape.prefill_tokens + self.c_seq * shape.decode_seqs
                + self.c_ctx * shape.context_tokens)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what save_cost_model writes)."""
        return {"format": FORMAT, "version": 1, "units": "seconds", **{k: getattr(self, k) for k in COEFFICIENTS},
                **{k: v for k, v in self.meta.items() if k not in COEFFICIENTS}}


def cost_model_from_json(data: Any, where: str = "cost model") -> CostModel:
    """Build a CostModel from a parsed JSON object; ValueError names the missing or bad key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {', '.join(COEFFICIENTS)}, "
                         f"got {type(data).__name__}")
    missing = [k for k in COEFFICIENTS if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; a cost model needs {', '.join(COEFFICIENTS)}")
    if data.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{where}: 'format' must be {FORMAT!r}, got {data['format']!r}")
    for k in COEFFICIENTS:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: key {k!r} must be a finite number >= 0 (seconds), got {v!r}")
    meta = {k: v for k, v in data.items() if k not in COEFFICIENTS and k not in ("format", "version", "units")}
    try:
        return CostModel(**{k: float(data[k]) for k in COEFFICIENTS}, meta=meta)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def load_cost_model(path: str | Path) -> CostModel:
    """Read a cost-model JSON file; ValueError for malformed JSON or missing/bad keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cost model file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cost model {path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return cost_model_from_json(data, f"cost model {path}")


def save_cost_model(model: CostModel, path: str | Path) -> None:
    """Write model as JSON."""
    Path(path).write_text(json.dumps(model.to_json(), indent=2) + "\n")


def default_cost_model() -> CostModel:
    """The profile shipped with llmfx: TinyLlama-1.1B shape on one H200 (see its 'source' field)."""
    text = resources.files("llmfx.sim").joinpath("profile_default.json").read_text()
    return cost_model_from_json(json.loads(text), "llmfx/sim/profile_default.json")


def fit_cost_model(points: Iterable[tuple[BatchShape, float]], meta: Mapping[str, Any] | None = None) -> CostModel:
    """Least-squares fit of the coefficients to measured (shape, seconds) points, all coefficients >= 0.

    A coefficient the unconstrained fit makes negative is fixed at 0 and the rest refit
    (an active-set heuristic; exact for the handful of regressors used here).
    """
    points = list(points)
    if not points:
        raise ValueError("fit_cost_model needs at least one measured point")
    xs = [p.features() for p, _ in points]
    ys = [float(t) for _, t in points]
    active = [j for j in range(len(COEFFICIENTS)) if any(x[j] for x in xs)]
    while True:
        beta = _lstsq([[x[j] for j in active] for x in xs], ys)
        worst = min(range(len(active)), key=lambda i: beta[i])
        if beta[worst] >= 0 or len(active) == 1:
            break
        active.pop(worst)
    coef = dict.fromkeys(COEFFICIENTS, 0.0)
    for j, b in zip(active, beta):
        coef[COEFFICIENTS[j]] = max(b, 0.0)
    fitted = [sum(coef[k] * f for k, f in zip(COEFFICIENTS, x)) for x in xs]
    rel = max(abs(f - y) / y for f, y in zip(fitted, ys)) if all(y > 0 for y in ys) else None
    info = dict(meta or {})
    info.setdefault("points", [
        {"prefill_tokens": p.prefill_tokens, "decode_seqs": p.decode_seqs, "context_tokens": p.context_tokens,
         "seconds": t} for p, t in points])
    info.setdefault("max_relative_error", rel)
    return CostModel(**coef, meta=info)


def _lstsq(a: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Minimum-norm least squares via the normal equations with a tiny ridge (few columns, no numpy needed)."""
    n = len(a[0])
    scale = [max(abs(row[j]) for row in a) or 1.0 for j in range(n)]  # column scaling for conditioning
    ata = [[sum(row[i] * row[j] for row in a) / (scale[i] * scale[j]) for j in range(n)] for i in range(n)]
    aty = [sum(row[i] * v for row, v in zip(a, y)) / scale[i] for i in range(n)]
    ridge = 1e-12 * max(ata[i][i] for i in range(n))
    for i in range(n):
        ata[i][i] += ridge
    # Gaussian elimination with partial pivoting.
    m = [r[:] + [b] for r, b in zip(ata, aty)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c and m[c][c]:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * z for x, z in zip(m[r], m[c])]
    return [(m[i][n] / m[i][i] if m[i][i] else 0.0) / scale[i] for i in range(n)]
