"""Measuring GPA: ASR error rates, TTS intelligibility, and speaker similarity for TTS and voice conversion.

Text normalisation (applied to references and predictions alike before scoring):
1. Unicode NFKC, then lower case;
2. every punctuation or symbol character (Unicode categories P* and S*) becomes a space;
3. runs of whitespace become one space, and the ends are stripped.
Word error rate splits the normalised text at spaces. Character error rate counts characters of the normalised text;
for text with CJK characters, where spaces carry no meaning, the spaces are removed first.
Each report gives the corpus rate (all edits / all reference units) and every item's own rate.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import evaluate
import jiwer
import numpy as np
import torch
from tqdm.auto import tqdm

from .audio_utils import pitch_track, write_wav
from .data_gpa import PreparationReport, read_row_audio
from .processing_gpa import has_cjk, run_requests

SpeakerEmbedder = Callable[[Sequence[np.ndarray]], torch.Tensor]
"""Maps 16 kHz mono waveforms to one speaker embedding each, shape (n, dim)."""


def normalize_text(text: str) -> str:
    """The normalisation described in the module docstring."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(char)[0] in "PS" else char for char in text)
    return " ".join(text.split())


def _char_text(text: str) -> str:
    return text.replace(" ", "") if has_cjk(text) else text


class GpaErrorRate(evaluate.Metric):
    """Word or character error rate with gpa-hf's text normalisation, as an `evaluate` metric.

    `GpaErrorRate().compute(predictions=..., references=..., unit="char")`. It works offline: unlike
    `evaluate.load("wer")`, nothing is fetched from the Hub.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Word / character error rate after NFKC, lower-casing and punctuation removal.",
            citation="",
            inputs_description="predictions and references: lists of strings; unit: 'word' or 'char'",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, unit: str = "word") -> dict[str, float]:
        return {unit_name(unit): error_rate(references, predictions, unit)}


def unit_name(unit: str) -> str:
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    return "wer" if unit == "word" else "cer"


def error_rate(references: Sequence[str], predictions: Sequence[str], unit: str) -> float:
    """Corpus error rate: all edits over all reference words (unit='word') or characters (unit='char')."""
    unit_name(unit)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    references = [normalize_text(text) for text in references]
    predictions = [normalize_text(text) for text in predictions]
    empty = [index for index, text in enumerate(references) if not text]
    if empty:
        raise ValueError(f"references {empty} are empty after normalisation; an error rate needs reference text")
    if unit == "word":
        return float(jiwer.wer(references, predictions))
    return float(jiwer.cer([_char_text(t) for t in references], [_char_text(t) for t in predictions]))


# ---- speaker embeddings ------------------------------------------------------------------------------------
class BiCodecSpeakerEmbedder:
    """The model's own speaker encoder: the d-vector BiCodec decodes with (from the 32 global tokens)."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    @torch.no_grad()
    def __call__(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        features = self.processor.feature_extractor.reference_features(list(waveforms), sampling_rate=16000)
        bicodec = self.model.bicodec
        codes = bicodec.encode_speaker(features["reference_values"].to(self.model.device)).global_codes
        return bicodec.speaker_embedding(codes).float().cpu()


class TransformersSpeakerEmbedder:
    """Any `transformers` x-vector model (`AutoModelForAudioXVector`, e.g. a WavLM speaker-verification model)."""

    def __init__(self, model_name_or_path: str, device: str | torch.device = "cpu"):
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        self.feature_extractor = AutoFeatureExtractor.from_pretrained(model_name_or_path)
        self.model = AutoModelForAudioXVector.from_pretrained(model_name_or_path).to(device).eval()

    @torch.no_grad()
    def __call__(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        inputs = self.feature_extractor(
            list(waveforms), sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt"
        ).to(self.model.device)
        return self.model(**inputs).embeddings.float().cpu()


@torch.no_grad()
def codec_conversion(
    model, processor, sources: Sequence[np.ndarray], voices: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Each source's own semantic tokens decoded with the global tokens of its voice clip: voice conversion by the
    codec alone, without the LM (16 kHz waveforms in, 16 kHz waveforms out).

    Beside a model's conversions it tells what the LM adds: a conversion no closer to the target voice than this gains
    nothing from the LM, and where even tokens of a perfect conversion decode no closer, the codec bounds the task.
    """
    extractor, bicodec = processor.feature_extractor.bicodec, model.bicodec
    inputs = extractor(list(sources), sampling_rate=16000, return_reference=False).to(model.device)
    encoded = bicodec.encode(inputs["input_values"], inputs["attention_mask"])
    reference = extractor.speaker_inputs(list(voices), sampling_rate=16000)["reference_values"].to(model.device)
    global_codes = bicodec.encode_speaker(reference).global_codes
    decoded = bicodec.decode(encoded.semantic_codes, global_codes, encoded.semantic_lengths)
    return [audio[:length].float().cpu().numpy() for audio, length in zip(decoded.audio_values, decoded.audio_lengths)]


def has_sound(waveform: np.ndarray) -> bool:
    """Whether an output has any non-zero sample (empty or silent outputs get no speaker embedding)."""
    return bool(waveform.size) and bool(np.abs(waveform).max() > 0)


def cosine_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1)


def median_pitch(
    waveform: np.ndarray, sampling_rate: int = 16000, min_hz: float = 60.0, max_hz: float = 400.0
) -> float | None:
    """Median fundamental frequency (Hz) over a clip's voiced frames; None when no frame is voiced.

    `pitch_track` on 40 ms frames every 10 ms. No model takes part, so it checks voice conversion independently of
    the speaker encoder behind the similarities.
    """
    frame, hop = int(0.04 * sampling_rate), int(0.01 * sampling_rate)
    samples = np.asarray(waveform, dtype=np.float64).reshape(-1)
    if samples.size < frame:
        return None
    track = pitch_track(samples, sampling_rate, hop, frame, min_hz, max_hz)
    voiced = track[track > 0]
    return float(np.median(voiced)) if voiced.size else None


def pitch_closer_to_target(output: float | None, target: float | None, source: float | None) -> bool | None:
    """Whether the output's median pitch is nearer (in log frequency) the target's than the source's.

    None when pitch cannot tell the two voices apart (either has no pitch, or they are within 10% of each other).
    An output without a measurable pitch is not closer: it did not take on the target's.
    """
    if target is None or source is None or max(target, source) < 1.1 * min(target, source):
        return None
    return output is not None and abs(math.log(output / target)) < abs(math.log(output / source))


# ---- evaluation runs ---------------------------------------------------------------------------------------
def _generate(model, processor, task: str, batch_size: int, generate_kwargs: dict, **request):
    """Outputs of a batch of requests; one longer than a prompt takes runs in pieces (`run_requests`)."""
    outputs = run_requests(model, processor, task, batch_size, generate_kwargs, sampling_rate=16000, **request)
    return outputs if task == "asr" else [audio.numpy() for audio in outputs]


def _load_rows(
    rows: list[dict], needed: Sequence[str], optional: Sequence[str] = ()
) -> tuple[list[dict], dict[str, Counter]]:
    """Rows with their audio decoded; rows that cannot be used are counted by reason, not dropped silently.

    `needed` columns must be present; `optional` audio columns are read when the row names a file.
    """
    usable, skipped = [], {}
    for index, row in enumerate(rows):
        item = {"index": index, **row}
        reason = ""
        if "text" in needed and not normalize_text(row.get("text") or ""):
            reason = "empty text"
        for name in [n for n in (*needed, *optional) if n != "text"]:
            if not row.get(name):
                reason = reason or (f"no {name}" if name in needed else "")
                continue
            samples = read_row_audio(row, name)
            if isinstance(samples, str):
                reason = reason or samples
            else:
                item[f"{name}_samples"] = samples
        if reason:
            skipped.setdefault(str(row.get("task", "")), Counter())[reason] += 1
        else:
            usable.append(item)
    return usable, skipped


def _batches(items: list, batch_size: int, description: str):
    for start in tqdm(range(0, len(items), batch_size), desc=description, disable=len(items) <= batch_size):
        yield items[start : start + batch_size]


def _recognizer(model, processor, asr_model: str | None, batch_size: int, generate_kwargs: dict):
    """Transcribe 16 kHz waveforms: with this GPA model's ASR, or with a named `transformers` ASR pipeline."""
    if asr_model is None:
        if model.speech_tokenizer is None:
            raise ValueError("the model was loaded without ASR; load it with tasks including 'asr' or pass asr_model=")

        def recognise(waveforms: list[np.ndarray]) -> list[str]:
            return _generate(model, processor, "asr", batch_size, generate_kwargs, audio=waveforms)

        return recognise
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=asr_model, device=model.device)

    def recognise(waveforms: list[np.ndarray]) -> list[str]:
        inputs = [{"raw": waveform, "sampling_rate": 16000} for waveform in waveforms]
        return [result["text"] for result in asr(inputs, batch_size=batch_size)]

    return recognise


def _scored(items: list[dict], predictions: list[str]) -> tuple[list[dict], dict]:
    """Per-item and corpus error rates: CER over all items, WER over the items whose text is not CJK."""
    results = []
    for item, prediction in zip(items, predictions):
        result = {"audio": item.get("audio"), "reference": item["text"], "prediction": prediction}
        result["cer"] = error_rate([item["text"]], [prediction], "char")
        if not has_cjk(item["text"]):
            result["wer"] = error_rate([item["text"]], [prediction], "word")
        results.append(result)
    metrics: dict = {"cer": error_rate([i["text"] for i in items], predictions, "char") if items else None}
    spaced = [(i["text"], p) for i, p in zip(items, predictions) if not has_cjk(i["text"])]
    if spaced:
        metrics["wer"] = error_rate([r for r, _ in spaced], [p for _, p in spaced], "word")
    return results, metrics


def evaluate_gpa(
    model,
    processor,
    rows: list[dict],
    task: str,
    batch_size: int = 8,
    asr_model: str | None = None,
    speaker_embedder: SpeakerEmbedder | None = None,
    generate_kwargs: dict | None = None,
    audio_dir: str | os.PathLike | None = None,
    codec_baseline: bool = False,
) -> dict:
    """Evaluate one task over data rows (the columns of `load_jsonl_dataset`) and return the report.

    - `asr`: every row with audio and text; character error rate over all items, word error rate over the items
      whose text is not CJK.
    - `tts`: every row with text; the voice is `ref_audio`, else the row's own `audio`, else the default voice.
      The synthesised audio is transcribed (by the model's own ASR, or the `asr_model` pipeline) and scored
      against the text; speaker similarity is the cosine between output and voice prompt embeddings.
    - `vc`: every row with a source `audio` and a target voice `ref_audio`; reports how often the output is closer
      to the target voice than to the source (speaker-embedding cosine), and, as a check without any model, how
      often its median pitch is closer to the target's (over the pairs whose pitches differ by 10% or more; an
      output with no voiced frame counts as not closer, and `outputs_without_pitch` counts them). With
      `codec_baseline`, the same scores for [`codec_conversion`] (the codec alone) as `metrics["codec_baseline"]`.
    """
    generate_kwargs = dict(generate_kwargs or {})
    needed = {"asr": ("audio", "text"), "tts": ("text",), "vc": ("audio", "ref_audio")}
    if task not in needed:
        raise ValueError(f"unknown task {task!r}: expected asr, tts or vc")
    items, skipped = _load_rows(rows, needed[task], optional=("ref_audio", "audio") if task == "tts" else ())
    embed = speaker_embedder or BiCodecSpeakerEmbedder(model, processor)
    results: list[dict] = []
    metrics: dict = {}
    if task == "asr":
        predictions = []
        for batch in _batches(items, batch_size, "asr"):
            predictions += _generate(
                model, processor, "asr", batch_size, generate_kwargs, audio=[i["audio_samples"] for i in batch]
            )
        results, metrics = _scored(items, predictions)
    elif task == "tts":
        recognise = _recognizer(model, processor, asr_model, batch_size, {"do_sample": False})
        outputs, predictions, similarities = [], [], []
        for batch in _batches(items, batch_size, "tts"):
            # The voice: the row's ref_audio, else its own recording, else (None) the model's default voice.
            voices = [i.get("ref_audio_samples", i.get("audio_samples")) for i in batch]
            wanted = [i["text"] for i in batch]
            audio = _generate(model, processor, "tts", batch_size, generate_kwargs, text=wanted, voice=voices)
            outputs += audio
            spoken = [index for index, waveform in enumerate(audio) if has_sound(waveform)]
            recognised = recognise([audio[k] for k in spoken]) if spoken else []
            texts = dict(zip(spoken, recognised))
            predictions += [texts.get(k, "") for k in range(len(batch))]  # no sound: nothing recognised
            with_prompt = [k for k, voice in enumerate(voices) if voice is not None and has_sound(audio[k])]
            scores = [None] * len(batch)
            if with_prompt:
                values = cosine_similarity(
                    embed([audio[k] for k in with_prompt]), embed([voices[k] for k in with_prompt])
                )
                for k, value in zip(with_prompt, values.tolist()):
                    scores[k] = value
            similarities += scores
        results, metrics = _scored(items, predictions)
        for result, audio, similarity in zip(results, outputs, similarities):
            result["duration_s"] = audio.size / 16000
            result["speaker_similarity"] = similarity
        measured = [value for value in similarities if value is not None]
        metrics["speaker_similarity"] = float(np.mean(measured)) if measured else None
        _write_audio(audio_dir, items, outputs)
    else:
        outputs, closer, baselines = [], [], []
        for batch in _batches(items, batch_size, "vc"):
            audio = _generate(
                model,
                processor,
                "vc",
                batch_size,
                generate_kwargs,
                audio=[i["audio_samples"] for i in batch],
                voice=[i["ref_audio_samples"] for i in batch],
            )
            outputs += audio
            # One embedding call per kind for the batch; outputs without sound get no similarity.
            sounding = [k for k, waveform in enumerate(audio) if has_sound(waveform)]
            to_target, to_source = {}, {}
            targets = embed([item["ref_audio_samples"] for item in batch])
            sources = embed([item["audio_samples"] for item in batch])
            if sounding:
                converted = embed([audio[k] for k in sounding])
                to_target = dict(zip(sounding, cosine_similarity(converted, targets[sounding]).tolist()))
                to_source = dict(zip(sounding, cosine_similarity(converted, sources[sounding]).tolist()))
            if codec_baseline:
                baseline = embed(
                    codec_conversion(
                        model, processor, [i["audio_samples"] for i in batch], [i["ref_audio_samples"] for i in batch]
                    )
                )
                baselines += zip(
                    cosine_similarity(baseline, targets).tolist(), cosine_similarity(baseline, sources).tolist()
                )
            for k, (item, waveform) in enumerate(zip(batch, audio)):
                target, source = to_target.get(k), to_source.get(k)
                closer.append(target is not None and target > source)
                pitch = {
                    "output": median_pitch(waveform),
                    "target": median_pitch(item["ref_audio_samples"]),
                    "source": median_pitch(item["audio_samples"]),
                }
                results.append(
                    {
                        "audio": item.get("audio"),
                        "ref_audio": item.get("ref_audio"),
                        "similarity_to_target": target,
                        "similarity_to_source": source,
                        "closer_to_target": closer[-1],
                        "pitch_hz": pitch,
                        "pitch_closer_to_target": pitch_closer_to_target(
                            pitch["output"], pitch["target"], pitch["source"]
                        ),
                        "duration_s": waveform.size / 16000,
                    }
                )
        metrics = {"closer_to_target_rate": float(np.mean(closer)) if closer else None}
        measured = [r for r in results if r["similarity_to_target"] is not None]
        if measured:
            metrics["similarity_to_target"] = float(np.mean([r["similarity_to_target"] for r in measured]))
            metrics["similarity_to_source"] = float(np.mean([r["similarity_to_source"] for r in measured]))
        by_pitch = [r["pitch_closer_to_target"] for r in results if r["pitch_closer_to_target"] is not None]
        metrics["pitch_closer_to_target_rate"] = float(np.mean(by_pitch)) if by_pitch else None
        metrics["pitch_pairs"] = len(by_pitch)
        metrics["outputs_without_pitch"] = sum(r["pitch_hz"]["output"] is None for r in results)
        if codec_baseline:
            for result, (target, source) in zip(results, baselines):
                result["codec_baseline_similarity"] = {"to_target": target, "to_source": source}
            metrics["codec_baseline"] = {
                "closer_to_target_rate": float(np.mean([target > source for target, source in baselines])),
                "similarity_to_target": float(np.mean([target for target, _ in baselines])),
                "similarity_to_source": float(np.mean([source for _, source in baselines])),
            }
        _write_audio(audio_dir, items, outputs)
    return {
        "task": task,
        "metrics": metrics,
        "num_items": len(results),
        "skipped": PreparationReport(skipped=skipped).to_dict()["skipped"],
        "normalisation": "NFKC, lower case, punctuation/symbols -> space, collapsed whitespace; CER drops spaces "
        "in CJK text",
        "items": results,
    }


def _write_audio(folder, items: list[dict], waveforms: list[np.ndarray]) -> None:
    if folder is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for item, waveform in zip(items, waveforms):
        write_wav(Path(folder) / f"{item['index']:05d}.wav", waveform)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the JSON report and a PNG plot beside it (same name, `.png`); returns the plot's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    items = report["items"]
    if report["task"] == "vc":
        measured = [i for i in items if i["similarity_to_target"] is not None]
        axis.scatter(
            [i["similarity_to_source"] for i in measured], [i["similarity_to_target"] for i in measured], s=14
        )
        axis.axline((0, 0), slope=1, color="grey", linewidth=0.8)
        axis.set_xlabel("cosine to source speaker")
        axis.set_ylabel("cosine to target speaker")
        metrics = report["metrics"]
        rate, pitch_rate = metrics.get("closer_to_target_rate"), metrics.get("pitch_closer_to_target_rate")
        title = f"voice conversion: closer to target in {rate:.0%} of pairs" if rate is not None else "vc"
        if pitch_rate is not None:
            title += f"\npitch closer to target's in {pitch_rate:.0%} of {metrics['pitch_pairs']}"
        axis.set_title(title)
    else:
        rates = [i["cer"] for i in items]
        axis.hist(rates, bins=20, range=(0, max([1.0, *rates])))
        axis.set_xlabel("per-item character error rate")
        axis.set_ylabel("items")
        summary = ", ".join(f"{k} {v:.3f}" for k, v in report["metrics"].items() if isinstance(v, float))
        axis.set_title(f"{report['task']}: {summary}")
    figure.tight_layout()
    plot = path.with_suffix(".png")
    figure.savefig(plot, dpi=100)
    plt.close(figure)
    return plot


__all__ = [
    "BiCodecSpeakerEmbedder",
    "GpaErrorRate",
    "TransformersSpeakerEmbedder",
    "codec_conversion",
    "error_rate",
    "evaluate_gpa",
    "median_pitch",
    "normalize_text",
    "pitch_closer_to_target",
    "write_report",
]
