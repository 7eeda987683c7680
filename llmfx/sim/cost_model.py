"""A parametric step-time model: ScheduledBatch -> seconds, fit by least squares, stored as JSON.

    device    = c0 + c_tok * prefill_tokens + c_seq * decode_seqs + c_ctx * context_tokens  (padded shape)
    host      = h0 + h_tok * prefill_tokens + h_seq * decode_seqs + h_ctx * context_tokens  (real shape)
    step_time = max(device, host)

- prefill_tokens: tokens of sequences fed more than one token this step (prompt chunks)
- decode_seqs: sequences fed exactly one token (decode steps, and one-token tail chunks)
- context_tokens: sum over sequences of start_pos + tokens fed (the KV that attention reads)

c0 is the fixed cost of a step (weight reads at small batch, launch overhead), c_tok the compute
of one prefill token, c_seq the per-sequence overhead, c_ctx one token of KV read. All in seconds.
The host terms are the serving loop's own work (schedule, pack, postprocess, responses): with the
overlap scheduler the host prepares step n+1 while the device runs step n, so a step lasts the
longer of the two. Without host terms (all h = 0) the model is the first line alone, the whole
step. With buckets (the engine's CUDA-graph shapes) the device is charged for the shape the graph
computes: a decode batch pads to a decode size; a mixed batch pads up to a token count, the padding
rows charged as prompt tokens.
"""

from __future__ import annotations

import dataclasses
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
HOST_COEFFICIENTS = ("h0", "h_tok", "h_seq", "h_ctx")  # optional: absent means 0
BUCKET_FIELDS = ("decode_buckets", "token_buckets")  # optional: absent means no padding
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
        num_tokens, num_decode, context_tokens = batch.columns.token_counts()
        return BatchShape(prefill_tokens=num_tokens - num_decode, decode_seqs=num_decode, context_tokens=context_tokens)

    def features(self) -> tuple[float, float, float, float]:
        """The regressors, in the order of COEFFICIENTS."""
        return (1.0, float(self.prefill_tokens), float(self.decode_seqs), float(self.context_tokens))

    def padded(self, decode_buckets: Sequence[int] = (), token_buckets: Sequence[int] = ()) -> BatchShape:
        """The shape a bucketed engine computes (llmfx.buckets.Buckets.key): decode rows pad to a decode size;
        a batch with prompt tokens pads its rows up to a token count, the padding counted as prompt tokens.
        Sizes beyond the largest bucket stay as they are; empty buckets mean no padding."""
        if self.prefill_tokens == 0:
            rows = _first_at_least(decode_buckets, self.decode_seqs) if self.decode_seqs else 0
            return BatchShape(prefill_tokens=0, decode_seqs=rows, context_tokens=self.context_tokens)
        rows = _first_at_least(token_buckets, self.prefill_tokens + self.decode_seqs)
        return BatchShape(prefill_tokens=rows - self.decode_seqs, decode_seqs=self.decode_seqs,
                          context_tokens=self.context_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSample:
    """One step the serving loop ran, as the profiler timed it."""

    shape: BatchShape  # the real (unpadded) batch
    seconds: float  # wall time of the loop charged to this step (what the simulator charges it)
    collect_s: float = 0.0  # of which blocked in engine.collect, waiting for the device
    host_s: float | None = None  # the loop's own work for this batch, wherever it ran; None: seconds - collect_s

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"StepSample.seconds must be a finite number > 0, got {self.seconds!r}")
        if not (math.isfinite(self.collect_s) and 0 <= self.collect_s <= self.seconds):
            raise ValueError(f"StepSample.collect_s must be in [0, seconds={self.seconds}], got {self.collect_s!r}")
        if self.host_s is not None and not (math.isfinite(self.host_s) and self.host_s >= 0):
            raise ValueError(f"StepSample.host_s must be None or a finite number >= 0, got {self.host_s!r}")

    @property
    def host(self) -> float:
        """Seconds of host work for this batch."""
        return self.seconds - self.collect_s if self.host_s is None else self.host_s

    def row(self) -> dict[str, float]:
        """A flat dict for JSON."""
        return {"prefill_tokens": self.shape.prefill_tokens, "decode_seqs": self.shape.decode_seqs,
                "context_tokens": self.shape.context_tokens, "seconds": self.seconds, "collect_s": self.collect_s,
                "host_s": self.host}


def _first_at_least(sizes: Sequence[int], n: int) -> int:
    return next((s for s in sizes if s >= n), n)


def _check_buckets(name: str, sizes: Any) -> tuple[int, ...]:
    values = tuple(sizes) if isinstance(sizes, (list, tuple)) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values) or any(
            a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"CostModel.{name} must be strictly ascending integers >= 1, got {sizes!r}")
    return values


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """step_time = max(device, host), each linear in the batch's features (seconds); see the module docstring."""

    c0: float
    c_tok: float = 0.0
    c_seq: float = 0.0
    c_ctx: float = 0.0
    h0: float = 0.0
    h_tok: float = 0.0
    h_seq: float = 0.0
    h_ctx: float = 0.0
    decode_buckets: tuple[int, ...] = ()  # ascending decode batch sizes the device pads to
    token_buckets: tuple[int, ...] = ()  # ascending token counts a batch with prompt tokens pads to
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # source, model, gpu, points...

    def __post_init__(self) -> None:
        for name in COEFFICIENTS + HOST_COEFFICIENTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"CostModel.{name} must be a finite number >= 0 (seconds), got {v!r}")
        if sum(getattr(self, k) for k in COEFFICIENTS + HOST_COEFFICIENTS) <= 0:
            raise ValueError("CostModel: at least one coefficient must be > 0, or every step would take no time")
        for name in BUCKET_FIELDS:
            object.__setattr__(self, name, _check_buckets(name, getattr(self, name)))
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
        return max(self.device_time(shape), self.host_time(shape))

    def device_time(self, shape: BatchShape) -> float:
        """The device (or, without host terms, whole-step) part: c coefficients on the padded shape."""
        x = shape.padded(self.decode_buckets, self.token_buckets).features()
        return sum(getattr(self, k) * f for k, f in zip(COEFFICIENTS, x))

    def host_time(self, shape: BatchShape) -> float:
        """The serving loop's host work for a step: h coefficients on the real shape."""
        return sum(getattr(self, k) * f for k, f in zip(HOST_COEFFICIENTS, shape.features()))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what save_cost_model writes)."""
        own = COEFFICIENTS + HOST_COEFFICIENTS + BUCKET_FIELDS
        extra = {k: getattr(self, k) for k in HOST_COEFFICIENTS if getattr(self, k)}
        extra.update({k: list(getattr(self, k)) for k in BUCKET_FIELDS if getattr(self, k)})
        return {"format": FORMAT, "version": 1, "units": "seconds", **{k: getattr(self, k) for k in COEFFICIENTS},
                **extra, **{k: v for k, v in self.meta.items() if k not in own}}


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
    present = [k for k in COEFFICIENTS + HOST_COEFFICIENTS if k in data]
    for k in present:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: key {k!r} must be a finite number >= 0 (seconds), got {v!r}")
    own = COEFFICIENTS + HOST_COEFFICIENTS + BUCKET_FIELDS + ("format", "version", "units")
    meta = {k: v for k, v in data.items() if k not in own}
    buckets = {k: data[k] for k in BUCKET_FIELDS if k in data}
    try:
        return CostModel(**{k: float(data[k]) for k in present}, **buckets, meta=meta)
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


def fit_cost_model(points: Iterable[tuple[BatchShape, float]], meta: Mapping[str, Any] | None = None, *,
                   relative: bool = False, decode_buckets: Sequence[int] = (),
                   token_buckets: Sequence[int] = ()) -> CostModel:
    """Least-squares fit of the c coefficients (the whole step) to measured (shape, seconds) points, all >= 0.

    relative=True minimizes relative rather than absolute errors, so short steps count as much as
    long ones. With buckets the features are those of the padded shape (see BatchShape.padded).
    """
    points = list(points)
    if not points:
        raise ValueError("fit_cost_model needs at least one measured point")
    ys = [float(t) for _, t in points]
    if relative and any(y <= 0 for y in ys):
        raise ValueError("fit_cost_model(relative=True) needs every measured time > 0")
    xs = [p.padded(decode_buckets, token_buckets).features() for p, _ in points]
    coef = _fit_nonneg(xs, ys, [1.0 / y for y in ys] if relative else [1.0] * len(ys))
    info = dict(meta or {})
    info.setdefault("points", [
        {"prefill_tokens": p.prefill_tokens, "decode_seqs": p.decode_seqs, "context_tokens": p.context_tokens,
         "seconds": t} for p, t in points])
    model = CostModel(**dict(zip(COEFFICIENTS, coef)), decode_buckets=tuple(decode_buckets),
                      token_buckets=tuple(token_buckets), meta=info)
    return _with_error(model, [(p, t) for p, t in points], info)


def fit_overlap_cost_model(samples: Iterable[StepSample], meta: Mapping[str, Any] | None = None, *,
                           decode_buckets: Sequence[int] = (), token_buckets: Sequence[int] = (),
                           device_bound: float = 0.1) -> CostModel:
    """Fit step_time = max(device, host) to steps timed in a serving loop that overlaps host and device.

    The host terms fit every sample's host work (StepSample.host). The device terms fit the whole
    time of device-bound samples (those that waited in collect for at least `device_bound` of
    their time or host work): there the device never idled, so the step lasted as long as the device
    ran it.
    Without device-bound samples (a CPU, an eager GPU path) the device terms are 0. Errors are
    relative to each sample's time (the longer of its charged time and its host work).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("fit_overlap_cost_model needs at least one StepSample")
    if not (isinstance(device_bound, (int, float)) and 0 < device_bound < 1):
        raise ValueError(f"device_bound must be a fraction in (0, 1), got {device_bound!r}")
    weights = [1.0 / max(s.seconds, s.host) for s in samples]
    host = _fit_nonneg([s.shape.features() for s in samples], [s.host for s in samples], weights)
    # Against the longer of the two: a synchronous launch (CPU) makes a step's host work exceed the time
    # charged to it, and its short wait in collect says nothing about a device.
    bound = [s for s in samples if s.collect_s >= device_bound * max(s.seconds, s.host)]
    device = [0.0] * len(COEFFICIENTS)
    if bound:
        device = _fit_nonneg([s.shape.padded(decode_buckets, token_buckets).features() for s in bound],
                             [s.seconds for s in bound], [1.0 / s.seconds for s in bound])
    info = dict(meta or {})
    info.setdefault("points", [s.row() for s in samples])
    info.setdefault("device_bound_points", len(bound))
    model = CostModel(**dict(zip(COEFFICIENTS, device)), **dict(zip(HOST_COEFFICIENTS, host)),
                      decode_buckets=tuple(decode_buckets), token_buckets=tuple(token_buckets), meta=info)
    # A step costs at least its host work, even where (synchronous launch) it was charged to the step before.
    return _with_error(model, [(s.shape, max(s.seconds, s.host)) for s in samples], info)


def _with_error(model: CostModel, points: Sequence[tuple[BatchShape, float]], info: dict[str, Any]) -> CostModel:
    """The model with meta['max_relative_error'] over the points it was fit to (unless the caller set it)."""
    if "max_relative_error" in info:
        return model
    ys = [t for _, t in points]
    rel = max(abs(model.step_time(p) - t) / t for p, t in points) if all(y > 0 for y in ys) else None
    return dataclasses.replace(model, meta={**info, "max_relative_error": rel})


def _fit_nonneg(xs: Sequence[Sequence[float]], ys: Sequence[float], ws: Sequence[float]) -> list[float]:
    """Weighted least squares with every coefficient >= 0.

    A coefficient the unconstrained fit makes negative is fixed at 0 and the rest refit (an
    active-set heuristic; exact for the handful of regressors used here). Columns that are zero
    in every row get 0.
    """
    n = len(xs[0])
    active = [j for j in range(n) if any(x[j] for x in xs)]
    coef = [0.0] * n
    if not active:
        return coef
    while True:
        beta = _lstsq([[x[j] * w for j in active] for x, w in zip(xs, ws)], [y * w for y, w in zip(ys, ws)])
        worst = min(range(len(active)), key=lambda i: beta[i])
        if beta[worst] >= 0 or len(active) == 1:
            break
        active.pop(worst)
    for j, b in zip(active, beta):
        coef[j] = max(b, 0.0)
    return coef


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
