"""Cost of building the per-step records: a frozen dataclass's own __init__ against llmfx.records.positional_builder
(and TokenEvent, a named tuple: its keyword constructor against tuple.__new__ from a tuple of fields).

    python benchmarks/records.py [--save DIR]

The scheduler once built SequenceState twice, a ScheduledSeq and a TokenEvent per sequence per step;
this times each way of building them (the best of 7 repeats of 200,000 builds, ns per build) so the
choice in llmfx/records.py rests on a committed figure.
"""

import argparse
import json
import time
import timeit
from pathlib import Path

from llmfx.records import positional_builder
from llmfx.sampling_params import SamplingParams
from llmfx.scheduler import Request, ScheduledSeq, SequenceState, TokenEvent, _token_event_of

REQUEST = Request(request_id=1, prompt_token_ids=(1, 2, 3), params=SamplingParams())
CASES = {  # class -> (keyword arguments, the same values in field order)
    SequenceState: ({"request": REQUEST, "output_token_ids": (4,), "num_computed_tokens": 3, "pages": (1,),
                     "num_inflight": 1, "beam": None}, (REQUEST, (4,), 3, (1,), 1, None)),
    ScheduledSeq: ({"request_id": 1, "token_ids": (4,), "start_pos": 3, "pages": (1,), "sample": True},
                   (1, (4,), 3, (1,), True)),
}
EVENT = ({"request_id": 1, "new_token_ids": (4,), "finish_reason": None, "stop_reason": None}, (1, (4,), None, None, ()))


def ns_per_call(fn, number: int = 200_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", default=None)
    args = p.parse_args()
    rows = []
    for cls, (keywords, values) in CASES.items():
        build = positional_builder(cls)
        assert build(*values) == cls(**keywords)
        row = {"record": cls.__name__, "dataclass_init_ns": round(ns_per_call(lambda: cls(**keywords)), 1),
               "positional_builder_ns": round(ns_per_call(lambda: build(*values)), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    keywords, values = EVENT
    row = {"record": "TokenEvent", "namedtuple_init_ns": round(ns_per_call(lambda: TokenEvent(**keywords)), 1),
           "tuple_new_ns": round(ns_per_call(lambda: _token_event_of(values)), 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        path = Path(args.save, f"{time.strftime('%Y-%m-%d')}-cpu-records.json")
        path.write_text(json.dumps({"machine": "cpu", "rows": rows}, indent=1) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
