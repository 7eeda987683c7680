"""The `llmfx` command line."""

from __future__ import annotations

import argparse
import sys
import time

from llmfx.presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfx", description="llmfx: LLM inference for researchers")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--model", default="tiny",
                     help=f"checkpoint dir, hub id in the local HF cache, or preset ({', '.join(PRESETS)})")
    gen.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt")
    args = parser.parse_args(argv)
    return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from llmfx.testing.reference import greedy_generate
    from llmfx.tokenizer import ByteTokenizer
    from llmfx.weights import load_params, resolve_model

    source = resolve_model(args.model)
    if source.path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.path)
    else:
        tokenizer = ByteTokenizer(vocab_size=source.config.vocab_size)
        print("note: a preset has random weights: its text is noise until you pass a real checkpoint", file=sys.stderr)
    params = load_params(source)
    for prompt in args.prompts:
        ids = tokenizer.encode(prompt)
        start = time.perf_counter()
        out = greedy_generate(params, source.config, ids, args.max_tokens, stop_token_ids=source.config.eos_token_ids)
        elapsed = time.perf_counter() - start
        print(f"{prompt!r} -> {tokenizer.decode(out, skip_special_tokens=True)!r}")
        print(f"  {len(out)} tokens in {elapsed:.2f} s ({len(out) / elapsed:.1f} tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
