"""Encode / decode speed of BiCodec and the GLM-4-Voice tokenizer at published sizes (random weights, CPU).

    python benchmarks/codec_speed.py --seconds 4 --threads 2 --output codec_speed.json

Prints seconds of compute per second of audio for each stage, and writes them as JSON.
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


def timed(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


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
    report = {name: seconds / args.seconds for name, seconds in results.items()}
    print(f"{'stage':48s} {'s per s of audio':>18s}")
    for name, value in report.items():
        print(f"{name:48s} {value:18.3f}")
    with open(args.output, "w") as handle:
        json.dump({"audio_seconds": args.seconds, "threads": args.threads, "seconds_per_audio_second": report}, handle)


if __name__ == "__main__":
    main()
