"""Arrival processes for the simulator: all at once, Poisson, bursty (gamma), and trace replay (JSONL/CSV)."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# A length is a fixed int or an inclusive (low, high) range drawn uniformly.
Length = int | tuple[int, int]
TRACE_FIELDS = ("arrival_time", "prompt_len", "output_len")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimRequest:
    """One simulated request: when it arrives, how long its prompt is, how many tokens it generates."""

    request_id: int
    arrival_time: float  # seconds from the start of the simulation
    prompt_len: int
    output_len: int  # the request runs with max_tokens=output_len, ignore_eos=True
    prompt_token_ids: tuple[int, ...] | None = None  # None: unique tokens (no prefix hits with other requests)
    abort_time: float | None = None  # the client aborts at this time unless it finished earlier
    # None: the request ends by length after output_len tokens. Larger than output_len: it may run to
    # max_tokens (what guaranteed_no_evict reserves) but a stop token ends it after output_len, as EOS
    # does; with overlap the engine then runs it one extra step, whose token is dropped.
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SimRequest {self.request_id}: {name} must be an integer >= 1, got {v!r}")
        for name in ("arrival_time", "abort_time"):
            v = getattr(self, name)
            if v is None and name == "abort_time":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SimRequest {self.request_id}: {name} must be a finite number >= 0, got {v!r}")
        m = self.max_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < self.output_len):
            raise ValueError(f"SimRequest {self.request_id}: max_tokens must be None or an integer >= "
                             f"output_len={self.output_len}, got {m!r}")
        if self.prompt_token_ids is not None:
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
            if len(self.prompt_token_ids) != self.prompt_len:
                raise ValueError(f"SimRequest {self.request_id}: prompt_token_ids has {len(self.prompt_token_ids)} "
                                 f"tokens but prompt_len={self.prompt_len}")

    def tokens(self) -> tuple[int, ...]:
        """The prompt's token ids: given ones, or ids unique to this request."""
        if self.prompt_token_ids is not None:
            return self.prompt_token_ids
        base = (self.request_id + 1) << 32
        return tuple(range(base, base + self.prompt_len))


def _draw(rng: random.Random, length: Length, name: str) -> int:
    if isinstance(length, tuple):
        lo, hi = length
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"{name} range must be (low, high) integers with 1 <= low <= high, got {length!r}")
        return rng.randint(lo, hi)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"{name} must be an integer >= 1 or a (low, high) range, got {length!r}")
    return length


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_requests must be an integer >= 1, got {n!r}")


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a finite number of requests per second > 0, got {rate!r}")


def _build(times: Sequence[float], prompt_len: Length, output_len: Length, rng: random.Random) -> list[SimRequest]:
    return [SimRequest(request_id=i, arrival_time=t, prompt_len=_draw(rng, prompt_len, "prompt_len"),
                       output_len=_draw(rng, output_len, "output_len")) for i, t in enumerate(times)]


def all_at_once(num_requests: int, *, prompt_len: Length = (100, 1024), output_len: Length = (100, 1024),
                seed: int = 0) -> list[SimRequest]:
    """Every request arrives at time 0 (an offline batch)."""
    _check_count(num_requests)
    return _build([0.0] * num_requests, prompt_len, output_len, random.Random(seed))


def poisson(num_requests: int, rate: float, *, prompt_len: Length = (100, 1024), output_len: Length = (100, 1024),
            seed: int = 0) -> list[SimRequest]:
    """Poisson arrivals at `rate` requests/s (exponential gaps), the first at time 0."""
    return bursty(num_requests, rate, cv=1.0, prompt_len=prompt_len, output_len=output_len, seed=seed)


def bursty(num_requests: int, rate: float, *, cv: float = 3.0, prompt_len: Length = (100, 1024),
           output_len: Length = (100, 1024), seed: int = 0) -> list[SimRequest]:
    """Gamma-distributed gaps with mean 1/rate and coefficient of variation cv (cv=1 is Poisson, >1 bursty)."""
    _check_count(num_requests)
    _check_rate(rate)
    if isinstance(cv, bool) or not isinstance(cv, (int, float)) or not math.isfinite(cv) or cv <= 0:
        raise ValueError(f"cv (coefficient of variation of the gaps) must be a finite number > 0, got {cv!r}")
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.gammavariate(shape, scale)
    return _build(times, prompt_len, output_len, rng)


def load_trace(path: str | Path) -> list[SimRequest]:
    """Read a trace: JSONL (one object a line) or CSV with a header, fields arrival_time, prompt_len, output_len.

    Optional fields: request_id (default: the row index), abort_time, max_tokens (the request then ends
    by a stop token after output_len tokens). Rows are sorted by arrival time.
    ValueError names the file, the line and the field of the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist")
    text = path.read_text()
    is_csv = path.suffix.lower() == ".csv" or (path.suffix.lower() not in (".jsonl", ".json", ".ndjson")
                                               and not text.lstrip().startswith("{"))
    rows = _csv_rows(path, text) if is_csv else _jsonl_rows(path, text)
    if not rows:
        raise ValueError(f"trace {path}: no requests (expected rows with {', '.join(TRACE_FIELDS)})")
    requests = [_trace_request(path, line, i, row) for i, (line, row) in enumerate(rows)]
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"trace {path}: request_id {dup} appears more than once")
    return sorted(requests, key=lambda r: r.arrival_time)


def save_trace(requests: Sequence[SimRequest], path: str | Path) -> None:
    """Write requests as JSONL (what load_trace reads)."""
    lines = []
    for r in requests:
        row = {"request_id": r.request_id, "arrival_time": r.arrival_time, "prompt_len": r.prompt_len,
               "output_len": r.output_len}
        if r.abort_time is not None:
            row["abort_time"] = r.abort_time
        if r.max_tokens is not None:
            row["max_tokens"] = r.max_tokens
        lines.append(json.dumps(row))
    Path(path).write_text("\n".join(lines) + "\n")


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"trace {path}, line {line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"trace {path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [f for f in TRACE_FIELDS if f not in header]
    if missing:
        raise ValueError(f"trace {path}, line 1: CSV header lacks field(s) {', '.join(missing)} "
                         f"(header: {', '.join(header) or 'empty'})")
    return [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]


def _trace_request(path: Path, line: int, index: int, row: dict) -> SimRequest:
    where = f"trace {path}, line {line}"
    values: dict = {}
    for name in TRACE_FIELDS + ("request_id", "abort_time", "max_tokens"):
        raw = row.get(name)
        if raw is None or raw == "":
            if name in TRACE_FIELDS:
                raise ValueError(f"{where}: missing field {name!r}")
            continue
        try:
            if name in ("arrival_time", "abort_time"):
                v = float(raw) if not isinstance(raw, bool) else math.nan
                ok = math.isfinite(v) and v >= 0
            else:
                v = int(raw) if not isinstance(raw, (bool, float)) else int(raw) if float(raw).is_integer() else None
                ok = v is not None and v >= (0 if name == "request_id" else 1)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            kind = "a number >= 0" if name in ("arrival_time", "abort_time") else (
                "an integer >= 0" if name == "request_id" else "an integer >= 1")
            raise ValueError(f"{where}: field {name!r} must be {kind}, got {raw!r}")
        values[name] = v
    values.setdefault("request_id", index)
    try:
        return SimRequest(**values)
    except ValueError as err:  # a check across fields (max_tokens >= output_len): name the line too
        raise ValueError(f"{where}: {err}") from None
