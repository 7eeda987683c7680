"""Which torch.compile settings build the TinyLlama-shape step, and how fast it decodes (GPU).

Each variant runs in its own process (a failed compile must not poison the next): it builds an
LLM with a few buckets, then times batch-1 and batch-8 decode. Prints one line per variant.
"""

import json
import subprocess
import sys

VARIANTS = {
    "dynamic-auto": {},
    "dynamic-auto, no split reductions": {"inductor_options": {"split_reductions": False}},
    "static per bucket": {"compile_dynamic": False},
}

CHILD = """
import json, sys, time
from llmfx import bench
from llmfx.llm import LLM
from llmfx.sampling_params import SamplingParams
from pathlib import Path
kw = json.loads(sys.argv[1])
path = bench.hf_checkpoint("tinyllama-1.1b", Path("/tmp/llmfx-bench"))
t0 = time.perf_counter()
llm = LLM(path, skip_tokenizer_init=True, dtype="bfloat16", max_batch_size=8, max_num_tokens=512,
          max_seq_len=512, cuda_graph_batch_sizes=[1, 8], **kw)
startup = time.perf_counter() - t0
res = {"startup_s": round(startup, 1)}
p = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True, detokenize=False)
for b in (1, 8):
    prompts = [[(7 * i + j) % 32000 for j in range(128)] for i in range(b)]
    llm.generate(prompts, p, use_tqdm=False)
    outs = llm.generate(prompts, p, use_tqdm=False)
    first = max(o.metrics.first_token_time for o in outs); end = max(o.metrics.finished_time for o in outs)
    res[f"b{b}_ms_per_step"] = round((end - first) / 127 * 1e3, 3)
llm.shutdown()
print("RESULT " + json.dumps(res))
"""

for name, kw in VARIANTS.items():
    if len(sys.argv) > 1 and name not in sys.argv[1:]:
        continue
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, timeout=400)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    err = [l for l in done.stderr.splitlines() if "Error" in l][-1:] if not lines else []
    print(f"{name:<36} {lines[0][7:] if lines else 'FAILED ' + ' '.join(err)}", flush=True)
