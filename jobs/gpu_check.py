"""One-command check of the real model on an accelerator: greedy identity to HF generate, and EAGLE's speed.

    python -m jobs.gpu_check [--device cuda] [--dtypes bf16,fp32] [--num-prompts 20] [--max-new-tokens 128]

For each dtype it loads SmolLM2-135M-Instruct and its committed EAGLE head (models/smollm2/, the target
converted on first use), then runs held-out prompts (half ShareGPT chat, half HumanEval code, through the chat
template) with HF `generate` (greedy) and with EAGLE speculative decoding on --tree, one prompt at a time,
interleaved. It prints tokens/s for both, the speedup, tau, and EAGLE's draft/verify milliseconds per step, and
checks that every EAGLE output is token-identical to HF's. Then, with --batch-size B above 1, the same prompts in
batches: HF `generate` on left-padded batches of B against eagleray's batched engine (`engine.batch`, up to B rows
decoding together on --tree), tokens/s of both and the identity of every batched row to HF's one-at-a-time greedy
output. For each divergence it prints the first diverging new token and the target's top-2 logit gap there (a
near-tie, a gap of a few hundredths in bf16, is rounding; a large gap is a bug). Exit status 1 on any mismatch,
2 when the device is not there. `--device cpu` runs the same check on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT, ensure_models
from jobs.results import write_json

CHAT_PROMPTS = "examples/chat_prompts.parquet"
CODE_PROMPTS = "examples/code_prompts.parquet"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("gpu_check"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="torch device to check on: cuda, cuda:1, cpu")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma list of {sorted(DTYPES)}")
    parser.add_argument(
        "--num-prompts", type=int, default=20, help="held-out prompts, half chat and half code"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--tree", default="60/5/10", help="EAGLE tree total_tokens/depth/top_k")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="rows per batch for the batched check (1: skip it)"
    )
    parser.add_argument("--models-root", default=DEFAULT_ROOT, help="folder with target/ and draft/")
    parser.add_argument(
        "--draft",
        default=None,
        help="draft head folder, EAGLE-1/2 or EAGLE-3 (default: MODELS_ROOT/draft; e.g. MODELS_ROOT/draft-eagle3)",
    )
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--num-prompts, --max-new-tokens and --batch-size must be >= 1")
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    return args


def held_out_prompts(num_prompts: int) -> list[tuple[str, str]]:
    """(source, text): the first ceil(n/2) chat prompts and the first floor(n/2) code prompts."""
    from jobs.prompts import read_prompt_column

    num_chat = (num_prompts + 1) // 2
    chat = read_prompt_column(CHAT_PROMPTS, "prompt", num_chat)
    code = read_prompt_column(CODE_PROMPTS, "prompt", num_prompts - num_chat) if num_prompts > 1 else []
    return [("chat", text) for text in chat] + [("code", text) for text in code]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def top2_gap(model, ids: list[int]) -> float:
    """The target's logit gap between its two most likely next tokens after `ids`."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def divergence(
    model, source: str, index: int, ids: list[int], output: list[int], reference: list[int]
) -> dict:
    at = first_divergence(output, reference)
    gap = top2_gap(model, ids + reference[:at]) if at < min(len(output), len(reference)) else None
    return {"prompt": index, "source": source, "first_divergence": at, "top2_logit_gap": gap}


def check_batched(model, target, head, encoded, references, eos, controller, args, sync) -> dict:
    """HF on left-padded batches against eagleray's batched engine, on the same prompts; identity to the
    one-at-a-time HF references."""
    from engine.batch import GenerationRequest, generate_batch
    from jobs.bench_batch import run_hf

    pad_id = eos[0] if eos else 0
    prompts = [ids for _, ids in encoded]
    sync()
    hf = run_hf(model, prompts, args.batch_size, args.max_new_tokens, tuple(eos), pad_id)
    sync()
    requests = [
        GenerationRequest(ids, args.max_new_tokens, controller, eos_token_ids=tuple(eos)) for ids in prompts
    ]
    started = time.perf_counter()
    results = generate_batch(target, head, requests, max_batch_size=args.batch_size)
    sync()
    seconds = time.perf_counter() - started
    outputs = [r.output.new_token_ids if r.output else [] for r in results]
    mismatches = [
        divergence(model, source, index, ids, output, reference)
        for index, ((source, ids), output, reference) in enumerate(
            zip(encoded, outputs, references, strict=True)
        )
        if output != reference
    ]
    tokens = sum(len(o) for o in outputs)
    return {
        "batch_size": args.batch_size,
        "hf_batched_tokens_per_s": hf["new_tokens"] / hf["seconds"],
        "eagle_batched_tokens_per_s": tokens / seconds,
        "speedup": (tokens / seconds) / (hf["new_tokens"] / hf["seconds"]),
        "identical": len(encoded) - len(mismatches),
        "hf_batched_identical": sum(o == r for o, r in zip(hf["outputs"], references, strict=True)),
        "mismatches": mismatches,
        "errors": [r.error for r in results if r.error],
    }


def check_dtype(paths: dict, device: torch.device, dtype: torch.dtype, prompts, args) -> dict:
    """HF greedy and EAGLE on every prompt in one dtype: speeds, tau, the draft/verify split, identity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.benchmark import hf_method
    from engine.chat import chat_eos_token_ids, prompt_ids
    from engine.generate import generate_speculative
    from engine.heads import load_draft_head
    from engine.target import TargetModel
    from engine.types import StaticController, TreeParams

    tokenizer = AutoTokenizer.from_pretrained(paths["target"])
    model = AutoModelForCausalLM.from_pretrained(paths["target"], dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    head = load_draft_head(paths["draft"], model)
    target = TargetModel(model)
    eos = list(chat_eos_token_ids(model, tokenizer))
    controller = StaticController(TreeParams.parse(args.tree))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    hf_greedy = hf_method(model, "hf_greedy", eos)

    def hf(ids: list[int], max_new_tokens: int) -> list[int]:
        return hf_greedy.run(ids, max_new_tokens).new_token_ids

    def eagle(ids: list[int], max_new_tokens: int):
        return generate_speculative(
            target, head, ids, controller, max_new_tokens=max_new_tokens, eos_token_id=eos, time_steps=True
        )

    encoded = [(source, prompt_ids(tokenizer, text)) for source, text in prompts]
    hf(encoded[0][1], 8)  # warm-up: kernels and allocations stay out of the timings
    eagle(encoded[0][1], 8)
    hf_seconds = eagle_seconds = draft_seconds = verify_seconds = 0.0
    hf_tokens = eagle_tokens = steps = 0
    mismatches, references = [], []
    for index, (source, ids) in enumerate(encoded):
        sync()
        started = time.perf_counter()
        reference = hf(ids, args.max_new_tokens)
        sync()
        hf_seconds += time.perf_counter() - started
        references.append(reference)
        started = time.perf_counter()
        out = eagle(ids, args.max_new_tokens)
        sync()
        eagle_seconds += time.perf_counter() - started
        hf_tokens += len(reference)
        eagle_tokens += out.num_new_tokens
        steps += len(out.steps)
        draft_seconds += sum(step.draft_seconds for step in out.steps)
        verify_seconds += sum(step.verify_seconds for step in out.steps)
        if out.new_token_ids != reference:
            mismatches.append(divergence(model, source, index, ids, out.new_token_ids, reference))
    hf_rate, eagle_rate = hf_tokens / hf_seconds, eagle_tokens / eagle_seconds
    batched = None
    if args.batch_size > 1:
        batched = check_batched(model, target, head, encoded, references, eos, controller, args, sync)
    return {
        "num_prompts": len(encoded),
        "hf_tokens_per_s": hf_rate,
        "eagle_tokens_per_s": eagle_rate,
        "speedup": eagle_rate / hf_rate,
        "tau": eagle_tokens / max(1, steps),
        "draft_ms_per_step": 1000 * draft_seconds / max(1, steps),
        "verify_ms_per_step": 1000 * verify_seconds / max(1, steps),
        "identical": len(encoded) - len(mismatches),
        "mismatches": mismatches,
        "batched": batched,
    }


def _divergence_line(name: str, miss: dict) -> str:
    gap = "" if miss["top2_logit_gap"] is None else f"; top-2 logit gap there {miss['top2_logit_gap']:.4f}"
    return (
        f"  {name}: {miss['source']} prompt {miss['prompt']} differs from HF from new token "
        f"{miss['first_divergence']}{gap}"
    )


def format_results(results: dict, tree: str) -> str:
    header = (
        f"{'dtype':<6} {'prompts':>7} {'HF tok/s':>9} {'EAGLE tok/s':>12} {'speedup':>8} {'tau':>5} "
        f"{'draft ms':>9} {'verify ms':>10} {'identical':>10}"
    )
    rows = [f"EAGLE tree {tree}", header, "-" * len(header)]
    for name, r in results.items():
        rows.append(
            f"{name:<6} {r['num_prompts']:>7} {r['hf_tokens_per_s']:>9.1f} {r['eagle_tokens_per_s']:>12.1f} "
            f"{r['speedup']:>7.2f}x {r['tau']:>5.2f} {r['draft_ms_per_step']:>9.1f} {r['verify_ms_per_step']:>10.1f} "
            f"{r['identical']:>4}/{r['num_prompts']:<5}"
        )
        rows += [_divergence_line(name, miss) for miss in r["mismatches"]]
        batched = r.get("batched")
        if batched:
            rows.append(
                f"{name:<6} batches of {batched['batch_size']}: HF {batched['hf_batched_tokens_per_s']:.1f} tok/s, "
                f"eagleray {batched['eagle_batched_tokens_per_s']:.1f} tok/s ({batched['speedup']:.2f}x), "
                f"identical to HF one at a time: eagleray {batched['identical']}/{r['num_prompts']}, "
                f"HF batched {batched['hf_batched_identical']}/{r['num_prompts']}"
            )
            rows += [_divergence_line(f"{name} batched", miss) for miss in batched["mismatches"]]
            rows += [f"  {name} batched: error {error}" for error in batched["errors"]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("jobs.gpu_check: CUDA is not available on this machine (use --device cpu)", file=sys.stderr)
        raise SystemExit(2)
    paths = ensure_models(args.models_root)
    if args.draft:
        paths = {**paths, "draft": args.draft}
    prompts = held_out_prompts(args.num_prompts)
    results = {}
    for name in args.dtypes.split(","):
        results[name] = check_dtype(paths, device, DTYPES[name], prompts, args)
        print(format_results({name: results[name]}, args.tree), flush=True)
    payload = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tree": args.tree,
        "draft": paths["draft"],
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }
    if args.json:
        write_json(args.json, payload)
    if any(
        r["mismatches"] or (r["batched"] and (r["batched"]["mismatches"] or r["batched"]["errors"]))
        for r in results.values()
    ):
        print("jobs.gpu_check: EAGLE's greedy output differs from HF generate (see above)", file=sys.stderr)
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
