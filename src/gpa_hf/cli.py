"""`gpa-hf`: the everyday jobs from the shell (tts, asr, vc, voice, tokenize, decode, prepare-data, finetune, eval,
convert)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .audio_utils import write_wav
from .configuration_gpa import TASKS
from .convert_codecs import CheckpointMismatchError
from .data_gpa import DEFAULT_MAX_LENGTH
from .default_model import DEFAULT_MODEL
from .generation_gpa import FUSED_TRITON_STEP
from .processing_gpa import run_requests

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff"}
MODEL_HELP = f"gpa-hf folder, Hub id or published-layout folder (default: the embedded gpa-tiny, {DEFAULT_MODEL})"


def _split_model(values: list[str], files: str) -> tuple[str, list[str]]:
    """`[MODEL] FILE...`: the first value is the model when it is a folder, or no file and not audio (a Hub id)."""
    first = values[0]
    names_model = Path(first).is_dir() or (
        not Path(first).exists() and Path(first).suffix.lower() not in AUDIO_SUFFIXES
    )
    if len(values) > 1 and names_model:
        return first, values[1:]
    if len(values) == 1 and Path(first).is_dir():
        raise ValueError(f"{first} is a folder: give the {files} after the model")
    return DEFAULT_MODEL, values


def load_gpa(
    model_path: str,
    tasks=TASKS,
    device: str = "cpu",
    int8: bool = False,
    audio_tokenizers_dtype: torch.dtype | None = None,
):
    """A published-layout folder (converted in memory) or a gpa-hf folder / Hub id -> (model, processor).

    The model is for inference: its projections are fused (`fuse_projections`). On a GPU the LM runs in bfloat16
    (the audio tokenizers stay float32); on CPU everything is float32, or with `int8` the LM is dynamic int8
    (`quantize_lm_dynamic_int8`). `audio_tokenizers_dtype` casts the audio tokenizers (`cast_audio_tokenizers`).
    """
    from .convert_gpa_original_to_hf import is_original_layout, load_original_gpa
    from .modeling_gpa import GpaForConditionalGeneration
    from .processing_gpa import GpaProcessor

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if is_original_layout(model_path):
        model, processor = load_original_gpa(model_path, tasks=tasks, dtype=dtype)
    else:
        model = GpaForConditionalGeneration.from_pretrained(model_path, tasks=list(tasks), dtype=dtype).eval()
        processor = GpaProcessor.from_pretrained(model_path)
    model.to(device).fuse_projections()
    if audio_tokenizers_dtype is not None:
        model.cast_audio_tokenizers(audio_tokenizers_dtype)
    return (model.quantize_lm_dynamic_int8() if int8 else model), processor


def _seeded_model(args, tasks):
    """Seed the sampler when `--seed` is given, then load the model for `tasks` on `--device`."""
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_gpa(
        args.model,
        tasks=tasks,
        device=device,
        int8=getattr(args, "int8", False),
        audio_tokenizers_dtype=torch.bfloat16 if getattr(args, "bf16_audio_tokenizers", False) else None,
    )


def _generate_kwargs(args) -> dict:
    kwargs = {}
    if getattr(args, "greedy", False):
        kwargs["do_sample"] = False
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    for name in ("static_decoding", "compile_decoding"):
        if getattr(args, name, False):
            kwargs[name] = getattr(args, name)  # True, or --compile's mode
    return kwargs


def _dry_run(args, task: str, **request) -> None:
    """Print the prompt ids (one list per prompt; a long request makes several) as JSON; generate nothing."""
    model, processor = _seeded_model(args, [task])
    prompts = []
    for arguments in processor.split(task, **request).batches(1):
        inputs = processor(**arguments)
        filled = model.fill_audio_tokens(**{k: v for k, v in inputs.items() if k != "attention_mask"})
        prompts += [ids[mask.bool()].tolist() for ids, mask in zip(filled, inputs["attention_mask"])]
    print(json.dumps({"input_ids": prompts[0] if len(prompts) == 1 else prompts}))


def _speak(args, task: str, **request) -> None:
    """Run a TTS or VC request and write its waveform to `args.output` (as it is generated with `--stream`)."""
    if args.dry_run:
        _dry_run(args, task, **request)
        return
    if getattr(args, "stream", False):
        _stream(args, task, **request)
        return
    model, processor = _seeded_model(args, [task])
    waveform = run_requests(model, processor, task, generate_kwargs=_generate_kwargs(args), **request)[0]
    rate = model.config.sampling_rate
    write_wav(args.output, waveform, rate)
    print(f"wrote {args.output} ({waveform.numel() / rate:.2f} s)")


def _stream(args, task: str, **request) -> None:
    """Write the audio of each piece of the request (see `GpaProcessor.split`) as it is generated."""
    import soundfile as sf

    model, processor = _seeded_model(args, [task])
    rate = model.config.sampling_rate
    started = time.perf_counter()
    samples, first_chunk_s = 0, None
    with sf.SoundFile(args.output, "w", samplerate=rate, channels=1, subtype="FLOAT") as output:
        for arguments in processor.split(task, **request).batches(1):
            inputs = processor(**arguments)
            for chunk in model.generate_stream(**inputs, task=task, **_generate_kwargs(args)):
                if first_chunk_s is None:
                    first_chunk_s = time.perf_counter() - started
                output.write(chunk.numpy())
                output.flush()
                samples += chunk.numel()
    first = f", first audio after {first_chunk_s:.2f} s" if first_chunk_s is not None else ""
    print(f"wrote {args.output} ({samples / rate:.2f} s{first})")


def cmd_tts(args) -> None:
    _speak(args, "tts", text=args.text, voice=args.voice)


def cmd_vc(args) -> None:
    _speak(args, "vc", audio=args.source, voice=args.voice)


def cmd_asr(args) -> None:
    if args.dry_run:
        _dry_run(args, "asr", audio=args.audio)
        return
    model, processor = _seeded_model(args, ["asr"])
    transcripts = run_requests(model, processor, "asr", args.batch_size, _generate_kwargs(args), audio=args.audio)
    texts = dict(zip(args.audio, transcripts))
    if args.json:
        print(json.dumps(texts, ensure_ascii=False))
    else:
        for path, text in texts.items():
            print(f"{path}\t{text}")


def _load_codecs(model_path: str):
    """(BiCodec, its features, GLM tokenizer, its features) from a published-layout or gpa-hf folder."""
    from .convert_codecs import BICODEC_DIR, GLM_TOKENIZER_DIR, load_original_bicodec, load_original_glm_tokenizer
    from .convert_gpa_original_to_hf import is_original_layout

    if is_original_layout(model_path):
        bicodec, bicodec_features = load_original_bicodec(Path(model_path) / BICODEC_DIR)
        glm, glm_features = load_original_glm_tokenizer(Path(model_path) / GLM_TOKENIZER_DIR)
        return bicodec, bicodec_features, glm, glm_features
    model, processor = load_gpa(model_path, tasks=["asr", "vc"])
    return model.bicodec, processor.feature_extractor.bicodec, model.speech_tokenizer, processor.feature_extractor.glm


def cmd_tokenize(args) -> None:
    bicodec, bicodec_features, glm, glm_features = _load_codecs(args.model)
    with torch.no_grad():
        encoded = bicodec.encode(**bicodec_features(args.audio))
        glm_encoded = glm.encode(**glm_features(args.audio))
    result = {}
    for index, path in enumerate(args.audio):
        result[path] = {
            "semantic": encoded.semantic_codes[index, : encoded.semantic_lengths[index]].tolist(),
            "global": encoded.global_codes[index].tolist(),
            "glm": glm_encoded.audio_codes[index, : glm_encoded.code_lengths[index]].tolist(),
        }
    if args.json:
        print(json.dumps(result))
    else:
        for path, tokens in result.items():
            print(
                f"{path}: {len(tokens['semantic'])} semantic, {len(tokens['global'])} global, {len(tokens['glm'])} glm"
            )


def cmd_decode(args) -> None:
    try:
        entries = json.loads(Path(args.tokens).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{args.tokens}: cannot read the tokens JSON ({error})") from error
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{args.tokens}: expected a JSON object of {{path: {{semantic, global}}}}")
    bicodec, *_ = _load_codecs(args.model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path, tokens in tqdm(entries.items(), desc="decode", disable=len(entries) < 2):
        if not isinstance(tokens, dict) or "semantic" not in tokens or "global" not in tokens:
            raise ValueError(f"{args.tokens}: entry {path!r} needs 'semantic' and 'global' token lists")
        with torch.no_grad():
            audio = bicodec.decode(torch.tensor([tokens["semantic"]]), torch.tensor([tokens["global"]])).audio_values
        target = output_dir / f"{Path(path).stem}.wav"
        write_wav(target, audio[0], bicodec.config.sampling_rate)
        print(f"wrote {target}")


def cmd_voice(args) -> None:
    from .convert_gpa_original_to_hf import voice_from_audio

    model, processor = load_gpa(args.model, tasks=["tts"])
    voice = voice_from_audio(model, processor, args.audio)
    voice.save(args.output)
    print(f"wrote {args.output} ({voice.global_codes.numel()} global tokens)")


def cmd_convert(args) -> None:
    from .convert_gpa_original_to_hf import convert_gpa_checkpoint

    convert_gpa_checkpoint(args.original_dir, args.output_dir, args.default_voice, args.lm_only_dir)
    print(f"wrote {args.output_dir}")


def _load_rows(data: str):
    """Data rows from a reference-format jsonl file or a `datasets.save_to_disk` folder."""
    from .data_gpa import load_jsonl_dataset

    if Path(data).is_dir():
        from datasets import load_from_disk

        return load_from_disk(data)
    return load_jsonl_dataset(data)


def cmd_prepare_data(args) -> None:
    from .data_gpa import prepare_dataset

    dataset = _load_rows(args.data)
    model, processor = load_gpa(args.model)
    prepared, report = prepare_dataset(
        dataset, model, processor, max_length=args.max_length, batch_size=args.batch_size, cache_dir=args.cache_dir
    )
    print(report)
    if report.num_kept == 0:
        raise ValueError(f"{args.data}: no row could be prepared")
    prepared.save_to_disk(args.output_dir)
    (Path(args.output_dir) / "preparation_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(f"wrote {args.output_dir} ({report.num_kept} rows)")


def cmd_finetune(args) -> None:
    from .training_gpa import add_lora, build_trainer, load_training_data

    model, processor = load_gpa(args.model)
    dataset = load_training_data(model, processor, args.data, args.max_length)
    if args.lora:
        model = add_lora(model)
        model.print_trainable_parameters()
    trainer = build_trainer(
        model,
        processor,
        dataset,
        args.output_dir,
        eval_fraction=args.eval_fraction,
        semantic_input_noise=args.semantic_input_noise,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing,
        micro_batches_by_length=args.micro_batches_by_length,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    final = trainer.model.merge_and_unload() if args.lora else trainer.model
    final.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"saved the fine-tuned model to {args.output_dir}")
    if args.push_to_hub:
        final.push_to_hub(args.push_to_hub)
        processor.push_to_hub(args.push_to_hub)
        print(f"pushed the fine-tuned model to the Hub as {args.push_to_hub}")


def cmd_eval(args) -> None:
    from .evaluation_gpa import TransformersSpeakerEmbedder, evaluate_gpa, write_report

    rows = list(_load_rows(args.data))
    if args.limit is not None:
        rows = rows[: args.limit]
    tasks = [args.task] if args.task == "asr" or args.asr_model else [args.task, "asr"]
    model, processor = _seeded_model(args, tasks)
    embedder = TransformersSpeakerEmbedder(args.speaker_model, model.device) if args.speaker_model else None
    report = evaluate_gpa(
        model,
        processor,
        rows,
        args.task,
        batch_size=args.batch_size,
        asr_model=args.asr_model,
        speaker_embedder=embedder,
        generate_kwargs=_generate_kwargs(args),
        audio_dir=args.audio_dir,
        codec_baseline=args.codec_baseline,
    )
    report["model"] = args.model
    report["data"] = args.data
    plot = write_report(report, args.output)
    print(json.dumps(report["metrics"], ensure_ascii=False))
    print(f"wrote {args.output} and {plot} ({report['num_items']} items)")


# `--compile`'s modes: torch.compile's (CUDA-graph modes left out: static decoding captures its own graph), and the
# fused Triton kernels. A closed list, so that `--compile MODEL_FOLDER` is an error rather than a mode.
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", FUSED_TRITON_STEP)


def _add_sampling(parser: argparse.ArgumentParser, dry_run: bool = True) -> None:
    parser.add_argument("--seed", type=int)
    parser.add_argument("--greedy", action="store_true", help="turn sampling off")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", dest="top_k", type=int)
    parser.add_argument("--top-p", dest="top_p", type=float)
    parser.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    parser.add_argument("--device", help="where to run: cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--int8", action="store_true", help="CPU: a dynamic int8 LM (about 2x faster; audio tokenizers stay float32)"
    )
    parser.add_argument(
        "--bf16-audio-tokenizers",
        action="store_true",
        help="run BiCodec and the GLM tokenizer in bfloat16: about 2x faster on CPUs with AVX512-BF16, no longer "
        "bit-exact",
    )
    parser.add_argument(
        "--static-decoding",
        dest="static_decoding",
        action="store_true",
        help="decode in gpa-hf's own loop: on GPU the prompt, each step and the codec are CUDA graphs over a static "
        "KV cache (several times faster there); on CPU the steps run in the caller's thread over an appending cache "
        "(the fastest eager batch-1 path there; faster still with --int8 --compile); --stream always does",
    )
    parser.add_argument(
        "--compile",
        dest="compile_decoding",
        nargs="?",
        const=True,
        default=False,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="with --static-decoding: torch.compile each step (on CPU with --int8: one graph with the int8 layers' "
        "own products, and one for the prompts; the first request compiles for a few minutes at published size: "
        "for servers, not one-off commands); MODE: a torch.compile mode, or 'triton' for gpa-hf's fused Triton "
        "kernels on GPU (six a layer; the fastest there)",
    )
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help="print the prompt ids as JSON, generate nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpa-hf", description="GPA text-to-speech, ASR and voice conversion")
    commands = parser.add_subparsers(dest="command", required=True)

    tts = commands.add_parser("tts", help="synthesise speech from text")
    tts.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    tts.add_argument("--text", required=True)
    tts.add_argument("--voice", help="reference audio or .voice file (default: the model's default voice)")
    tts.add_argument("--output", required=True)
    tts.add_argument("--stream", action="store_true", help="write audio chunks to --output as they are generated")
    _add_sampling(tts)
    tts.set_defaults(func=cmd_tts)

    asr = commands.add_parser("asr", help="transcribe audio files (one batch)")
    asr.add_argument("audio", nargs="+", metavar="[MODEL] AUDIO", help=f"audio files, after an optional {MODEL_HELP}")
    asr.add_argument("--json", action="store_true")
    asr.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    _add_sampling(asr)
    asr.set_defaults(func=cmd_asr)

    vc = commands.add_parser("vc", help="say the source speech in another voice")
    vc.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    vc.add_argument("--source", required=True)
    vc.add_argument("--voice", required=True)
    vc.add_argument("--output", required=True)
    vc.add_argument("--stream", action="store_true", help="write audio chunks to --output as they are generated")
    _add_sampling(vc)
    vc.set_defaults(func=cmd_vc)

    tokenize = commands.add_parser("tokenize", help="audio -> semantic, global and GLM codebook indices")
    tokenize.add_argument(
        "audio", nargs="+", metavar="[MODEL] AUDIO", help=f"audio files, after an optional {MODEL_HELP}"
    )
    tokenize.add_argument("--json", action="store_true")
    tokenize.set_defaults(func=cmd_tokenize)

    decode = commands.add_parser("decode", help="tokens JSON (from tokenize --json) -> WAV files")
    decode.add_argument(
        "tokens", nargs="+", metavar="[MODEL] TOKENS", help=f"tokens JSON, after an optional {MODEL_HELP}"
    )
    decode.add_argument("--output-dir", dest="output_dir", required=True)
    decode.set_defaults(func=cmd_decode)

    voice = commands.add_parser("voice", help="save the voice of a recording as a reusable .voice file")
    voice.add_argument(
        "audio", nargs="+", metavar="[MODEL] AUDIO", help=f"a recording, after an optional {MODEL_HELP}"
    )
    voice.add_argument("--output", required=True)
    voice.set_defaults(func=cmd_voice)

    prepare = commands.add_parser("prepare-data", help="tokenize a jsonl data file into a training dataset")
    prepare.add_argument("model")
    prepare.add_argument("data", help="reference-format .jsonl (paths relative to it) or a datasets folder")
    prepare.add_argument("output_dir", help="written with datasets' save_to_disk")
    prepare.add_argument("--max-length", dest="max_length", type=int, default=DEFAULT_MAX_LENGTH)
    prepare.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    prepare.add_argument("--cache-dir", dest="cache_dir", help="tokenization cache (default: the datasets cache)")
    prepare.set_defaults(func=cmd_prepare_data)

    finetune = commands.add_parser(
        "finetune", help="train the LM on a jsonl data file or a prepare-data folder (transformers' Trainer)"
    )
    finetune.add_argument("model")
    finetune.add_argument("data", help="reference-format .jsonl (prepared and cached first) or a prepare-data folder")
    finetune.add_argument("--output-dir", dest="output_dir", required=True, help="checkpoints and the final model")
    finetune.add_argument("--epochs", type=float, default=2)
    finetune.add_argument(
        "--max-steps", dest="max_steps", type=int, default=-1, help="stop after N steps (-1: epochs)"
    )
    finetune.add_argument("--learning-rate", dest="learning_rate", type=float, default=1e-5)
    finetune.add_argument("--batch-size", dest="batch_size", type=int, default=2)
    finetune.add_argument("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int, default=1)
    finetune.add_argument(
        "--eval-fraction", dest="eval_fraction", type=float, default=0.05, help="rows held out, evaluated each epoch"
    )
    finetune.add_argument("--max-length", dest="max_length", type=int, default=DEFAULT_MAX_LENGTH)
    finetune.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    finetune.add_argument(
        "--group-by-length",
        dest="group_by_length",
        action="store_true",
        help="batch rows of similar length together (less padding, faster)",
    )
    finetune.add_argument(
        "--micro-batches-by-length",
        dest="micro_batches_by_length",
        type=int,
        default=1,
        metavar="N",
        help="run each batch as N micro-batches of rows of similar length, each padded to its own longest row: the "
        "same batches and gradient as N=1, less padding computed (faster on CPU; 2 suits gpa-tiny's batches of 16)",
    )
    finetune.add_argument(
        "--semantic-input-noise",
        dest="semantic_input_noise",
        type=float,
        default=0.0,
        help="probability that a semantic input token of a training sequence is replaced by another (its label "
        "stays): makes TTS and VC robust to their own sampling errors",
    )
    finetune.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all LM weights (peft)")
    finetune.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir (same settings)"
    )
    finetune.add_argument(
        "--push-to-hub", dest="push_to_hub", metavar="REPO_ID", help="also upload the final model and processor"
    )
    finetune.set_defaults(func=cmd_finetune)

    evaluate = commands.add_parser("eval", help="measure ASR error rates, TTS intelligibility or VC similarity")
    evaluate.add_argument("model")
    evaluate.add_argument("data", help="reference-format .jsonl (paths relative to it) or a datasets folder")
    evaluate.add_argument("--task", required=True, choices=["asr", "tts", "vc"])
    evaluate.add_argument("--output", required=True, help="JSON report; a PNG plot is written beside it")
    evaluate.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N rows")
    evaluate.add_argument("--asr-model", dest="asr_model", help="transformers ASR model for TTS (default: GPA's own)")
    evaluate.add_argument(
        "--speaker-model", dest="speaker_model", help="transformers x-vector model (default: BiCodec speaker encoder)"
    )
    evaluate.add_argument("--audio-dir", dest="audio_dir", help="also write the synthesised audio here")
    evaluate.add_argument(
        "--codec-baseline",
        dest="codec_baseline",
        action="store_true",
        help="vc: also score the codec alone (each source's own tokens decoded in the target voice, no LM)",
    )
    _add_sampling(evaluate, dry_run=False)
    evaluate.set_defaults(func=cmd_eval)

    convert = commands.add_parser("convert", help="published GPA folder -> gpa-hf folder")
    convert.add_argument("original_dir")
    convert.add_argument("output_dir")
    convert.add_argument("--default-voice", dest="default_voice", help="audio or .voice file of the default voice")
    convert.add_argument("--lm-only-dir", dest="lm_only_dir", help="also write the LM alone as a plain Qwen3 folder")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("asr", "tokenize", "voice"):
            args.model, args.audio = _split_model(args.audio, "audio files")
        elif args.command == "decode":
            args.model, args.tokens = _split_model(args.tokens, "tokens JSON")
        if args.command in ("voice", "decode"):
            given = args.audio if args.command == "voice" else args.tokens
            if len(given) != 1:
                raise ValueError(f"{args.command} takes one input file after the model, got {given}")
            if args.command == "voice":
                args.audio = given[0]
            else:
                args.tokens = given[0]
        args.func(args)
    except (ValueError, CheckpointMismatchError, OSError, ModuleNotFoundError) as error:
        print(f"gpa-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
