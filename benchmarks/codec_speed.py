"""Encode / decode speed of BiCodec and the GLM-4-Voice tokenizer at published sizes (random weights, CPU).

    python benchmarks/codec_speed.py --seconds 4 --threads 2 --output codec_speed.json

Prints seconds of compute per second of audio for each stage, and writes them as JSON, with the arithmetic a decode
does (convolution and linear layers, counted from their shapes) and the rate the decode runs it at: BiCodec's wave
generator is compute-bound, so that rate against the cores' peak says how much faster float32 decoding can get.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from gpa_hf import (
    BiCodecConfig,
    BiCodecFeatureExtractor,
    BiCodecModel,
    GlmSpeechTokenizerConfig,
    GlmSpeechTokenizerFeatureExtractor,
    GlmSpeechTokenizerModel,
)
from gpa_hf.modeling_bicodec import BiCodecDilatedConv1d


def timed(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def decode_flops(bicodec: BiCodecModel, semantic_codes: torch.Tensor, global_codes: torch.Tensor) -> int:
    """Multiply-adds x 2 of the convolutions, transposed convolutions and linear layers in one `decode`, as run
    (Winograd convolutions count their products)."""
    total = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.ConvTranspose1d):  # every input sample meets every kernel tap
            positions, taps = inputs[0].shape[0] * inputs[0].shape[-1], module.kernel_size[0]
        elif isinstance(module, BiCodecDilatedConv1d) and module.uses_winograd(inputs[0]):
            # Winograd's F(m, k): m + k - 1 products per m outputs (its transforms, a few per cent, not counted)
            positions = output.shape[0] * output.shape[-1]
            taps = (module.winograd_outputs + module.kernel_size[0] - 1) / module.winograd_outputs
        elif isinstance(module, torch.nn.Conv1d):
            positions, taps = output.shape[0] * output.shape[-1], module.kernel_size[0]
        elif isinstance(module, torch.nn.Linear):
            total += 2 * inputs[0].numel() * module.out_features
            return
        else:
            return
        total += round(2 * positions * taps * module.in_channels * module.out_channels / module.groups)

    handles = [module.register_forward_hook(count) for module in bicodec.modules()]
    try:
        bicodec.decode(semantic_codes, global_codes)
    finally:
        for handle in handles:
            handle.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="codec_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(16000 * args.seconds))).astype(np.float32)

    bicodec = BiCodecModel(BiCodecConfig()).eval()
    glm = GlmSpeechTokenizerModel(GlmSpeechTokenizerConfig()).eval()
    bicodec_inputs = BiCodecFeatureExtractor()(audio, sampling_rate=16000)
    glm_inputs = GlmSpeechTokenizerFeatureExtractor()(audio, sampling_rate=16000)
    with torch.inference_mode():
        encoded = bicodec.encode(**bicodec_inputs)
        results = {
            "bicodec_encode (wav2vec2 + encoder + speaker)": timed(
                lambda: bicodec.encode(**bicodec_inputs), args.repeats
            ),
            "bicodec_speaker_only": timed(
                lambda: bicodec.encode_speaker(bicodec_inputs["reference_values"]), args.repeats
            ),
            "bicodec_decode": timed(
                lambda: bicodec.decode(encoded.semantic_codes, encoded.global_codes), args.repeats
            ),
            "glm_tokenize": timed(lambda: glm.encode(**glm_inputs), args.repeats),
        }
        flops = decode_flops(bicodec, encoded.semantic_codes, encoded.global_codes)
    report = {name: seconds / args.seconds for name, seconds in results.items()}
    print(f"{'stage':48s} {'s per s of audio':>18s}")
    for name, value in report.items():
        print(f"{name:48s} {value:18.3f}")
    decode_gflop = flops / 1e9 / args.seconds
    decode_rate = flops / 1e9 / results["bicodec_decode"]
    print(f"bicodec_decode: {decode_gflop:.1f} GFLOP per s of audio, run at {decode_rate:.0f} GFLOP/s")
    with open(args.output, "w") as handle:
        json.dump(
            {
                "audio_seconds": args.seconds,
                "threads": args.threads,
                "seconds_per_audio_second": report,
                "bicodec_decode_gflop_per_audio_second": decode_gflop,
                "bicodec_decode_gflop_per_s": decode_rate,
            },
            handle,
        )


if __name__ == "__main__":
    main()
