"""End-to-end speed of GPA at published sizes (random weights, nothing downloaded): the reference path vs gpa-hf.

    python benchmarks/gpa_speed.py --threads 2 --output gpa_speed.json

Reference path (what the published scripts do per request): the stock float32 `Qwen3ForCausalLM.generate` over
the full vocabulary, one request at a time, with the voice re-tokenized through wav2vec2 + the BiCodec encoder for
every request. gpa-hf: `GpaForConditionalGeneration.generate` (task constraint, only the allowed output rows), the
voice computed once from the speaker path, batched requests, the LM in float32 / bfloat16 / int8, static decoding
(`static_decoding=True`: a static KV cache and, on GPU, one CUDA graph per step, optionally `torch.compile`d; on
CPU, the int8 LM's steps also compiled, with oneDNN's int8 products), streaming, and, last, the fastest variant
again with its audio tokenizers in bfloat16 (`cast_audio_tokenizers`, opt-in: the default keeps them float32),
with how many tokens and how much of the audio stay those of float32.
On GPU every variant, and on CPU every compiled one, is run once before it is timed (graph capture and
compilation happen then; on CPU the first compiled request's time is reported).
Random weights never stop on their own, so every TTS request generates exactly `--tokens` semantic tokens
(200 = 4 s of audio). Prints a table and writes it as JSON; peak memory of a TTS-only process is measured in a
child process.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from transformers import Qwen3ForCausalLM, Wav2Vec2Model

from gpa_hf import BiCodecFeatureExtractor, GlmSpeechTokenizerFeatureExtractor, GpaConfig, GpaForConditionalGeneration
from gpa_hf.processing_gpa import GLM_PLACEHOLDER, SEMANTIC_PLACEHOLDER

# The published LM (config.json of AutoArk-AI/GPA) and vocabulary layout.
PUBLISHED_LM = {
    "hidden_size": 512,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "vocab_size": 180_480,
}
PUBLISHED_LAYOUT = {
    "text_vocab_size": 151_643,
    "glm_offset": 151_727,
    "glm_size": 16_384,
    "global_offset": 168_111,
    "global_size": 4_096,
    "semantic_offset": 172_207,
    "semantic_size": 8_192,
    "start_content": 151_669,
    "end_content": 151_670,
    "start_glm": 151_671,
    "end_glm": 151_672,
    "start_semantic": 151_673,
    "end_semantic": 151_674,
    "start_global": 151_675,
    "end_global": 151_676,
    "stop": 151_645,
}
TEXT_TOKENS = 40  # a sentence of about 4 s
ASR_NEW_TOKENS = 20  # about 4 s of speech in text tokens
SAMPLING_RATE = 16000


def published_gpa(tasks: list[str]) -> GpaForConditionalGeneration:
    config = GpaConfig(**PUBLISHED_LM, vocabulary_layout=PUBLISHED_LAYOUT, tasks=tasks, pad_token_id=151_643)
    return GpaForConditionalGeneration(config).eval()


def tts_prompt(voice: torch.Tensor, batch_size: int, seed: int = 0) -> torch.LongTensor:
    layout = PUBLISHED_LAYOUT
    text = torch.randint(0, 150_000, (batch_size, TEXT_TOKENS), generator=torch.Generator().manual_seed(seed))
    head = torch.tensor([layout["start_global"]]).expand(batch_size, 1)
    middle = torch.tensor([layout["end_global"], layout["start_content"]]).expand(batch_size, 2)
    tail = torch.tensor([layout["end_content"]]).expand(batch_size, 1)
    voice_ids = (voice + layout["global_offset"]).expand(batch_size, -1)
    return torch.cat([head, voice_ids, middle, text, tail], dim=1)


def clock(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def median_seconds(function, runs: int) -> float:
    """Median wall time of `runs` calls: single latencies on a shared machine vary by +-20%."""
    return float(np.median([clock(function)[0] for _ in range(runs)]))


def exact_length(tokens: int) -> dict:
    return {"do_sample": False, "min_new_tokens": tokens, "max_new_tokens": tokens}


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, does not inherit the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def tts_only_memory(tokens: int) -> None:
    """Child process: load a TTS-only GPA, serve one request, print the peak resident memory."""
    model = published_gpa(["tts"]).fuse_projections()
    voice = torch.randint(0, 4096, (1, 32))
    with torch.inference_mode():
        output = model.generate(tts_prompt(voice, 1), task="tts", output_audio=True, **exact_length(tokens))
    assert output.audio[0].numel() == tokens * 320
    print(json.dumps({"peak_rss_gb": peak_rss_gb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="gpa_speed.json")
    parser.add_argument("--latency-runs", type=int, default=5, help="first-chunk and ASR times: median of this many")
    parser.add_argument("--tts-only-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tts_only_memory:
        tts_only_memory(args.tokens)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    audio_seconds = args.tokens * 320 / SAMPLING_RATE
    rng = np.random.default_rng(0)
    voice_clip = (0.1 * rng.standard_normal(int(4.2 * SAMPLING_RATE))).astype(np.float32)
    asr_clip = (0.1 * rng.standard_normal(4 * SAMPLING_RATE)).astype(np.float32)

    with torch.device(device):  # random initialisation where the model runs (fast on GPU)
        model = published_gpa(["tts", "asr", "vc"])
    bicodec_features = BiCodecFeatureExtractor()
    glm_features = GlmSpeechTokenizerFeatureExtractor()
    voice_inputs = bicodec_features(voice_clip, sampling_rate=SAMPLING_RATE).to(device)
    rows: list[tuple[str, str, float]] = []
    results: dict[str, float] = {}

    def record(key: str, label: str, value: float, unit: str) -> None:
        results[key] = value
        rows.append((label, f"{value:.3f}", unit))
        print(f"{label:84s} {value:10.3f}  {unit}", file=sys.stderr, flush=True)  # progress, as it is measured

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        # ---- reference path: stock Qwen3 over the full vocabulary, voice through wav2vec2 per request ----------
        with torch.device(device):
            reference_lm = Qwen3ForCausalLM(model.config.lm_config()).eval()
        reference_lm.load_state_dict(model.state_dict(), strict=False)
        # The reference runs all 24 wav2vec2 layers; gpa-hf builds only the 17 whose hidden states BiCodec reads.
        reference_codec = copy.deepcopy(model.bicodec)
        with torch.device(device):
            reference_codec.semantic_model = Wav2Vec2Model(model.config.bicodec_config.semantic_model_config).eval()
        voice_seconds, encoded = clock(lambda: reference_codec.encode(**voice_inputs))
        voice = encoded.global_codes
        prompt = tts_prompt(voice.cpu(), 1).to(device)
        reference_lm.generate(prompt, **exact_length(4))  # warm-up
        lm_seconds, sequences = clock(lambda: reference_lm.generate(prompt, **exact_length(args.tokens)))
        semantic = (sequences[:, prompt.shape[1] :] % 8192).clamp(min=0)
        model.bicodec.decode(semantic[:, :8], voice)  # warm-up (on GPU: the convolution kernels' first load)
        sync()
        decode_seconds, _ = clock(lambda: model.bicodec.decode(semantic, voice))
        sync()
        record("reference_lm_tokens_per_s", "reference: LM tokens/s (batch 1)", args.tokens / lm_seconds, "tok/s")
        record("reference_voice_s", "reference: voice via wav2vec2 + encoder (4.2 s clip)", voice_seconds, "s")
        record("reference_decode_s", "reference: BiCodec decode", decode_seconds, "s")
        record(
            "reference_tts_rtf",
            "reference: TTS real-time factor (voice + LM + decode)",
            (voice_seconds + lm_seconds + decode_seconds) / audio_seconds,
            "x",
        )
        reference_lm.to("meta")  # frees its weights

        # ---- gpa-hf ------------------------------------------------------------------------------------------
        model.fuse_projections()
        speaker_seconds, voice = clock(lambda: model.bicodec.encode_speaker(voice_inputs["reference_values"]))
        voice = voice.global_codes
        record("gpa_voice_s", "gpa-hf: voice via the speaker path only (once per voice)", speaker_seconds, "s")

        def tts_run(lm_model, batch_size: int, options: dict) -> tuple[float, float]:
            prompts = tts_prompt(voice.cpu(), batch_size).to(device)
            # Warm-up: the same request where steps are compiled or graphs captured per shape, else a short one.
            same = device == "cuda" or options.get("compile_decoding")
            warm_up_seconds, _ = clock(
                lambda: lm_model.generate(
                    prompts if same else prompts[:1], task="tts", **exact_length(args.tokens if same else 4), **options
                )
            )
            first_compiled = f"gpa_compiled_first_request_s_batch{batch_size}"
            if device == "cpu" and options.get("compile_decoding") and first_compiled not in results:
                label = f"gpa-hf: first compiled request, batch {batch_size} (compilation + {args.tokens} tokens)"
                record(first_compiled, label, warm_up_seconds, "s")
            sync()
            seconds, output = clock(
                lambda: lm_model.generate(
                    prompts, task="tts", output_audio=True, **exact_length(args.tokens), **options
                )
            )
            sync()
            assert all(audio.numel() == args.tokens * 320 for audio in output.audio)
            return seconds, seconds / (batch_size * audio_seconds)

        variants = [("float32", model, {})]
        bf16 = copy.deepcopy(model)
        bf16.model.to(torch.bfloat16)
        bf16.lm_head.to(torch.bfloat16)
        variants.append(("bfloat16", bf16, {}))
        if device == "cpu":  # dynamic int8 for the decoder layers; codecs and the (row-restricted) output stay float32
            int8 = copy.deepcopy(model).quantize_lm_dynamic_int8()
            variants += [
                ("int8", int8, {}),
                ("int8 static", int8, {"static_decoding": True}),
                ("int8 static compiled", int8, {"static_decoding": True, "compile_decoding": True}),
            ]
        else:
            variants += [
                ("bfloat16 static", bf16, {"static_decoding": True}),
                ("bfloat16 static compiled", bf16, {"static_decoding": True, "compile_decoding": True}),
                ("bfloat16 static triton", bf16, {"static_decoding": True, "compile_decoding": "triton"}),
            ]
        for name, variant, options in variants:
            seconds, rtf = tts_run(variant, 1, options)
            key = name.replace(" ", "_")
            record(f"gpa_{key}_tts_rtf_batch1", f"gpa-hf {name}: TTS real-time factor, batch 1", rtf, "x")
            record(
                f"gpa_{key}_tokens_per_s_batch1",
                f"gpa-hf {name}: tokens/s incl. decode, batch 1",
                args.tokens / seconds,
                "tok/s",
            )
        # The two fastest variants at batch 1 are run batched (their order can change with the batch size), and the
        # faster one also serves streaming and ASR.
        ranked = sorted(variants, key=lambda item: results[f"gpa_{item[0].replace(' ', '_')}_tts_rtf_batch1"])
        batched = [
            (tts_run(variant, args.batch_size, options), name, variant, options)
            for name, variant, options in ranked[:2]
        ]
        (seconds, rtf), best_name, best, best_options = min(batched, key=lambda item: item[0][1])
        record(
            "gpa_tts_rtf_batch",
            f"gpa-hf {best_name}: TTS aggregate real-time factor, batch {args.batch_size}",
            rtf,
            "x",
        )
        record(
            "gpa_tokens_per_s_batch",
            f"gpa-hf {best_name}: aggregate tokens/s incl. decode, batch {args.batch_size}",
            args.batch_size * args.tokens / seconds,
            "tok/s",
        )

        # ---- streaming: time to first audio chunk ------------------------------------------------------------
        prompt = tts_prompt(voice.cpu(), 1).to(device)
        if device == "cuda":  # warm-up: the codec's kernels for the first chunk's window
            list(best.generate_stream(prompt, task="tts", **exact_length(args.tokens), **best_options))
        sync()

        def first_chunk() -> torch.Tensor:
            stream = best.generate_stream(prompt, task="tts", **exact_length(args.tokens), **best_options)
            chunk = next(stream)
            stream.close()
            return chunk

        first_chunk_seconds = median_seconds(first_chunk, args.latency_runs)
        chunks = list(best.generate_stream(prompt, task="tts", **exact_length(args.tokens), **best_options))
        label = f"gpa-hf {best_name}: streaming, time to first audio chunk (median of {args.latency_runs})"
        record("gpa_stream_first_chunk_s", label, first_chunk_seconds, "s")
        offline = best.generate(
            prompt, task="tts", output_audio=True, **exact_length(args.tokens), **best_options
        ).audio[0]
        streamed = torch.cat(chunks)
        assert streamed.numel() == offline.numel(), "streamed and offline lengths differ"
        snr = 10 * torch.log10(offline.pow(2).sum() / (offline - streamed).pow(2).sum().clamp(min=1e-20))
        record("gpa_stream_snr_db", "gpa-hf: streamed vs offline waveform, signal-to-noise", float(snr), "dB")

        # ---- ASR of a 4 s clip, end to end (features, both tokenizers, LM) -----------------------------------
        def asr_once(lm_model) -> None:
            bicodec_inputs = bicodec_features(asr_clip, sampling_rate=SAMPLING_RATE)
            glm_inputs = glm_features(asr_clip, sampling_rate=SAMPLING_RATE)
            layout = PUBLISHED_LAYOUT
            # What `generate` does with a processor's ASR inputs: both tokenizers (side by side on CPU), then the LM.
            audio_ids = lm_model.audio_token_ids(
                source_values=bicodec_inputs["input_values"],
                source_attention_mask=bicodec_inputs["attention_mask"],
                glm_input_features=glm_inputs["input_features"],
                glm_attention_mask=glm_inputs["attention_mask"],
            )
            ids = [
                layout["start_glm"],
                *audio_ids[GLM_PLACEHOLDER][0].tolist(),
                layout["end_glm"],
                layout["start_semantic"],
                *audio_ids[SEMANTIC_PLACEHOLDER][0].tolist(),
                layout["end_semantic"],
                layout["start_content"],
            ]
            lm_model.generate(
                torch.tensor([ids], device=device), task="asr", **exact_length(ASR_NEW_TOKENS), **best_options
            )

        asr_once(best)  # warm-up
        sync()
        seconds = median_seconds(lambda: asr_once(best), args.latency_runs)
        label = f"gpa-hf {best_name}: ASR of a 4 s clip, end to end (median of {args.latency_runs})"
        record("gpa_asr_4s_clip_s", label, seconds, "s")

        # ---- the same with the audio tokenizers in bfloat16 (`cast_audio_tokenizers`, opt-in) ---------------
        bicodec_inputs = bicodec_features(asr_clip, sampling_rate=SAMPLING_RATE).to(device)
        glm_inputs = glm_features(asr_clip, sampling_rate=SAMPLING_RATE).to(device)
        float32_codes = best.bicodec.encode(**bicodec_inputs).semantic_codes
        float32_glm = best.speech_tokenizer.encode(**glm_inputs).audio_codes
        float32_audio = best.bicodec.decode(float32_codes, voice).audio_values
        best.cast_audio_tokenizers(torch.bfloat16)
        name = f"gpa-hf {best_name}, bf16 audio tokenizers"
        for batch_size in (1, args.batch_size):
            _, rtf = tts_run(best, batch_size, best_options)
            label = f"{name}: TTS {'aggregate ' if batch_size > 1 else ''}real-time factor, batch {batch_size}"
            record(f"gpa_bf16_codecs_tts_rtf_batch{batch_size}", label, rtf, "x")
        seconds = median_seconds(first_chunk, args.latency_runs)
        label = f"{name}: streaming, time to first audio chunk (median of {args.latency_runs})"
        record("gpa_bf16_codecs_stream_first_chunk_s", label, seconds, "s")
        asr_once(best)  # warm-up
        seconds = median_seconds(lambda: asr_once(best), args.latency_runs)
        record(
            "gpa_bf16_codecs_asr_4s_clip_s", f"{name}: ASR of a 4 s clip (median of {args.latency_runs})", seconds, "s"
        )
        same_semantic = (best.bicodec.encode(**bicodec_inputs).semantic_codes == float32_codes).float().mean()
        same_glm = (best.speech_tokenizer.encode(**glm_inputs).audio_codes == float32_glm).float().mean()
        audio = best.bicodec.decode(float32_codes, voice).audio_values.float()
        snr = 10 * torch.log10(float32_audio.pow(2).sum() / (float32_audio - audio).pow(2).sum())
        record(
            "gpa_bf16_codecs_same_semantic_tokens",
            f"{name}: semantic tokens equal to float32",
            float(same_semantic),
            "",
        )
        record("gpa_bf16_codecs_same_glm_tokens", f"{name}: GLM tokens equal to float32", float(same_glm), "")
        record("gpa_bf16_codecs_decode_snr_db", f"{name}: decoded audio vs float32, signal-to-noise", float(snr), "dB")

    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 1024**3
        record("gpu_peak_memory_gb", "peak GPU memory of this benchmark (all variants loaded)", memory, "GB")
    else:
        child = subprocess.run(
            [sys.executable, __file__, "--tts-only-memory", "--threads", str(args.threads), "--tokens", "50"],
            capture_output=True,
            text=True,
            check=True,
        )
        memory = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_gb"]
        record("gpa_tts_only_peak_rss_gb", "gpa-hf: peak memory of a TTS-only process (float32)", memory, "GB")

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    print(f"{'measurement':84s} {'value':>10s}  unit   ({device_name}, {args.tokens} tokens = {audio_seconds:g} s)")
    for label, value, unit in rows:
        print(f"{label:84s} {value:>10s}  {unit}")
    with open(args.output, "w") as handle:
        json.dump({"device": device_name, "tokens": args.tokens, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
