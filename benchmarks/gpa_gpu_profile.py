"""Where a GPU text-to-speech request spends its time (published sizes, random weights, nothing downloaded).

    python benchmarks/gpa_gpu_profile.py --output gpa_gpu_profile.json

For the fastest GPU path of `gpa_speed.py` (bfloat16 LM, `static_decoding=True, compile_decoding=True`): the
whole request, its prompt pass (prefill) as a CUDA graph and eagerly, one decoding step (graph replay), the codec
on 200 tokens with and without its CUDA graph, the time to the first streamed chunk, and the kernels of one
decoding step (count and GPU time, from `torch.profiler`), which says how far a step is from the time its kernels
need. Prints a table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from gpa_speed import exact_length, median_seconds, published_gpa, tts_prompt

from gpa_hf import BiCodecFeatureExtractor


def cuda_seconds(function, runs: int) -> float:
    """Median wall time of `runs` calls, each waited for on the GPU."""

    def timed() -> None:
        function()
        torch.cuda.synchronize()

    timed()
    return median_seconds(timed, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--output", default="gpa_gpu_profile.json")
    parser.add_argument(
        "--compile-mode",
        help="torch.compile mode of the decoding step (default: its default), or 'triton' for gpa-hf's fused kernels",
    )
    parser.add_argument(
        "--fused-blocks",
        type=json.loads,
        default={},
        help="with --compile-mode triton: tile sizes of the fused kernels, as JSON (e.g. '{\"qkv_block_n\": 32}'; "
        "fields of gpa_hf.gpu_kernels.FusedStepBlocks)",
    )
    parser.add_argument(
        "--sweep",
        type=json.loads,
        default=[],
        help="with --compile-mode triton: a JSON list of tile settings (fields of FusedStepBlocks, as for "
        "--fused-blocks); the decoding step is timed again with each, in this process",
    )
    parser.add_argument(
        "--unfused", action="store_true", help="keep the stock separate projections (no `fuse_projections`)"
    )
    args = parser.parse_args()
    if (args.fused_blocks or args.sweep) and args.compile_mode != "triton":
        parser.error("--fused-blocks and --sweep set the fused kernels of --compile-mode triton")
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA device")
    if args.fused_blocks or args.sweep:
        from gpa_hf import gpu_kernels

        gpu_kernels.DEFAULT_FUSED_STEP_BLOCKS = gpu_kernels.FusedStepBlocks(**args.fused_blocks)
        torch._dynamo.config.recompile_limit += len(args.sweep)  # a step's compiled tail may compile again for each
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = published_gpa(["tts"])
    if not args.unfused:
        model.fuse_projections()
    model.model.to(torch.bfloat16)
    model.lm_head.to(torch.bfloat16)
    clip = (0.1 * np.random.default_rng(0).standard_normal(4 * 16000)).astype(np.float32)
    reference = BiCodecFeatureExtractor()(clip, sampling_rate=16000)["reference_values"].cuda()
    results: dict[str, float] = {}

    def record(key: str, label: str, value: float, unit: str) -> None:
        results[key] = value
        print(f"{label:72s} {value:10.3f}  {unit}", flush=True)

    options = {"task": "tts", "static_decoding": True, "compile_decoding": args.compile_mode or True}
    options.update(exact_length(args.tokens))
    with torch.inference_mode():
        voice = model.bicodec.encode_speaker(reference).global_codes
        prompt = tts_prompt(voice.cpu(), 1).cuda()
        started = time.perf_counter()
        model.generate(prompt, output_audio=True, **options)  # compiles the step, captures the graphs
        torch.cuda.synchronize()
        record("first_request_s", "first request (compilation and graph capture)", time.perf_counter() - started, "s")
        seconds = cuda_seconds(lambda: model.generate(prompt, output_audio=True, **options), 5)
        record("request_s", f"TTS request, {args.tokens} tokens, with audio", seconds, "s")
        record("rtf", "TTS real-time factor", seconds / (args.tokens * 320 / 16000), "x")
        seconds = cuda_seconds(lambda: model.generate(prompt, **options), 5)
        record("lm_s", "LM alone (prefill + steps + host checks)", seconds, "s")

        (decoder,) = model.static_decoders.values()
        multiple = decoder.prefill_multiple
        padded = -(-prompt.shape[1] // multiple) * multiple
        ids = torch.nn.functional.pad(prompt, (padded - prompt.shape[1], 0), value=decoder.pad_token_id)
        mask = torch.nn.functional.pad(torch.ones_like(prompt), (padded - prompt.shape[1], 0))
        seconds = cuda_seconds(lambda: decoder.prefill_graphs(ids, mask), 20)
        label = f"prefill of {prompt.shape[1]} tokens (padded to {padded}), graph"
        record("prefill_graph_ms", label, 1e3 * seconds, "ms")
        seconds = cuda_seconds(lambda: decoder.prefill(ids, mask), 5)
        record("prefill_eager_ms", "prefill, eager", 1e3 * seconds, "ms")
        decoder.prefill_graphs(ids, mask)
        steps = 50  # 4 x 50 steps after the prompt stay inside the cache
        seconds = cuda_seconds(lambda: [decoder.step() for _ in range(steps)], 3)
        record("step_ms", "one decoding step (graph replay)", 1e3 * seconds / steps, "ms")

        codes = torch.randint(0, 8192, (1, args.tokens), device="cuda")
        lengths = torch.tensor([args.tokens], device="cuda")
        for graphed in (False, True):
            seconds = cuda_seconds(lambda g=graphed: model.synthesize(codes, voice, lengths, cuda_graphs=g), 10)
            name = "graph" if graphed else "eager"
            record(f"codec_{name}_ms", f"codec, {args.tokens} tokens, {name}", 1e3 * seconds, "ms")

        def first_chunk() -> None:
            stream = model.generate_stream(prompt, **options)
            next(stream)
            stream.close()

        first_chunk()
        record("first_chunk_ms", "streaming: first audio chunk", 1e3 * median_seconds(first_chunk, 9), "ms")

        sweep, measured_step = [], decoder.fused_step
        for fields in args.sweep:  # the same decoder with other fused kernels: its step graph captured again
            blocks = dataclasses.replace(gpu_kernels.DEFAULT_FUSED_STEP_BLOCKS, **fields)
            decoder.fused_step = gpu_kernels.GpaFusedDecodingStep(model.model, 1, decoder.max_cache_len, blocks)
            decoder.step_graph.clear()
            decoder.prefill_graphs(ids, mask)
            decoder.step()  # compiles the kernels, captures the step
            decoder.prefill_graphs(ids, mask)
            seconds = cuda_seconds(lambda: [decoder.step() for _ in range(steps)], 3)
            sweep.append({"blocks": fields, "step_ms": 1e3 * seconds / steps})
            label = f"one decoding step with {json.dumps(fields)}"
            print(f"{label:72s} {1e3 * seconds / steps:10.3f}  ms", flush=True)
        decoder.fused_step = measured_step
        decoder.step_graph.clear()

        decoder.prefill_graphs(ids, mask)
        decoder.forward_step()  # the compiled step, eagerly: its kernels one by one
        torch.cuda.synchronize()
        profiled = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(profiled):
                decoder.forward_step()
            torch.cuda.synchronize()
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(event.device_time for event in kernels) / profiled
    record("kernels_per_step", "kernels in one decoding step", len(kernels) / profiled, "")
    record("kernel_ms_per_step", "their GPU time, back to back", busy / 1e3, "ms")
    by_name: dict[str, float] = {}
    for event in kernels:
        by_name[event.name] = by_name.get(event.name, 0.0) + event.device_time / profiled
    print("heaviest kernels of a step (us):")
    for name, micros in sorted(by_name.items(), key=lambda item: -item[1])[:12]:
        print(f"  {micros:8.1f}  {name[:100]}")
    with open(args.output, "w") as handle:
        summary = {"device": torch.cuda.get_device_name(), "compile_mode": args.compile_mode or "default"}
        summary.update(fused_projections=not args.unfused, fused_blocks=args.fused_blocks)
        summary.update(tokens=args.tokens, results=results, sweep=sweep)
        json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
