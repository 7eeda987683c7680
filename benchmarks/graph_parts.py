"""Device time of the step's parts, each replayed as a CUDA graph (GPU only).

For the TinyLlama shape (dummy bf16 weights) and a few decode batch sizes, compiles as the engine does
(`bench.compile_static`: inductor's kernels with PDL, no cudagraphs) and captures by hand: the model forward alone, the sampler alone, and forward +
sampler; replays each and reports microseconds per replay from CUDA events. The sampler runs as
the engine runs it for the chosen sampling (for greedy without logprobs: without the filters,
their vocabulary sort and the top-20) and, as `sampler_filtering_us`, with the filters, which every batch ran before the variant
without them existed. With --trace, prints the CUDA kernels of one forward + sampler replay at the
smallest batch, grouped by name. With --prefill-tokens N, the forward of one full prefill step instead: the
offline workload's first prompts, N tokens in all (the last prompt cut), as the engine's first steps run it.
"""

import argparse
import json
from pathlib import Path

import torch

from llmfx.bench import (compile_static, decode_batch, decoder_weight_params, graph_replay_us, offline_prefill_lengths,
                         prefill_batch, preset_dummy_params, print_kernel_table, save_rows)
from llmfx.models import forward
from llmfx.sampler import PenaltyState, SamplingTensors, sample, token_words
from llmfx.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--sampling", default="greedy", choices=["greedy", "top_p"])
    parser.add_argument("--save", default=None)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--prefill-tokens", type=int, default=0, help="time one prefill step of this many tokens")
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg, params = preset_dummy_params(args.model, device)
    if args.prefill_tokens:
        prefill(args, params, cfg, device)
        return
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        kv, inputs = decode_batch(cfg, batch, args.context, torch.bfloat16, device)
        p = SamplingParams(temperature=0.0) if args.sampling == "greedy" else SamplingParams(temperature=0.8, top_p=0.9)
        tensors = SamplingTensors.build([p] * batch, [1] * batch, [args.context + 1] * batch, device)
        penalties = PenaltyState(prompt_mask=torch.zeros(batch, cfg.vocab_size, dtype=torch.bool, device=device),
                                 output_counts=torch.zeros(batch, cfg.vocab_size, dtype=torch.int32, device=device))
        logits = torch.randn(batch, cfg.vocab_size, device=device)
        words = token_words(cfg.vocab_size, device)  # as the engine passes them: computed once
        fwd = compile_static(lambda: forward(params, cfg, inputs, kv), device)
        smp = compile_static(lambda: sample(logits, tensors, penalties, filtering=p.filters, top_logprobs=p.filters,
                                            words=words), device)
        smp_filtering = compile_static(lambda: sample(logits, tensors, penalties, filtering=True, words=words), device)
        both = compile_static(lambda: sample(forward(params, cfg, inputs, kv), tensors, penalties, filtering=p.filters,
                                             top_logprobs=p.filters, words=words), device)
        with torch.inference_mode():
            row = {"batch": batch, "sampling": args.sampling}
            parts = (("forward_us", fwd),) if args.forward_only else (
                ("forward_us", fwd), ("sampler_filtering_us", smp_filtering), ("sampler_us", smp),
                ("forward_sampler_us", both))
            for name, fn in parts:
                row[name], graph = graph_replay_us(fn)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.trace and batch == int(args.batches.split(",")[0]):
                print_kernel_table(graph, args.save and Path(args.save, f"graph_parts_trace_b{batch}.txt"))
    if args.save:
        save_rows(Path(args.save), f"graph_parts-{args.sampling}.json", rows, model=args.model,
                  context=args.context)


def prefill(args, params, cfg, device) -> None:
    """The forward of one prefill step (compiled, captured by hand): its replay time and, with --trace, kernels."""
    lengths = offline_prefill_lengths(args.prefill_tokens)
    kv, inputs = prefill_batch(cfg, lengths, torch.bfloat16, device)
    fwd = compile_static(lambda: forward(params, cfg, inputs, kv), device)
    with torch.inference_mode():
        us, graph = graph_replay_us(fwd, iters=20)
    tokens = sum(lengths)
    row = {"prefill_tokens": tokens, "prompts": len(lengths), "forward_us": us,
           "linear_tflops": 2 * tokens * decoder_weight_params(cfg) / us / 1e6}
    print(json.dumps(row), flush=True)
    if args.trace:
        print_kernel_table(graph, args.save and Path(args.save, f"graph_parts_trace_prefill{tokens}.txt"))
    if args.save:
        save_rows(Path(args.save), f"graph_parts-prefill{tokens}.json", [row], model=args.model, lengths=lengths)


if __name__ == "__main__":
    main()
