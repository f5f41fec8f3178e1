"""Pipelines: `pipeline("text-to-speech" | "automatic-speech-recognition" | "voice-conversion", model=GPA)`.

The stock text-to-audio and ASR pipelines feed a model raw text or features; GPA needs task prompts with audio
codes written in. The classes below subclass the stock pipelines and take over only for GPA models (any other
model runs the stock code path unchanged); `voice-conversion` is a new task.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    AutomaticSpeechRecognitionPipeline,
    AutoModelForCausalLM,
    AutoModelForTextToWaveform,
    Pipeline,
    TextToAudioPipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling_gpa import GpaForConditionalGeneration
from .processing_gpa import GpaProcessor

MAX_SENTENCE_CHARACTERS = 200
_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？；…])\s+|(?<=[。！？；])")


def split_sentences(text: str, max_characters: int = MAX_SENTENCE_CHARACTERS) -> list[str]:
    """Cut long text at sentence ends into pieces of at most `max_characters` (a longer sentence stays whole)."""
    pieces, current = [], ""
    for sentence in (s.strip() for s in _SENTENCE_END.split(text.strip())):
        if not sentence:
            continue
        if current and len(current) + 1 + len(sentence) > max_characters:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return pieces


class GpaPipelineMixin:
    """Runs GPA requests in groups of `batch_size`, each group as one batched `generate` call.

    A GPA model needs only its processor, found by the model's name when not given, so the subclasses load the stock
    pipelines' tokenizer and feature extractor only where they can (`pipeline(task, model=model_object)` works for a
    model in memory, e.g. after `Trainer`); for other models they still require them, as the stock pipelines do.
    """

    @staticmethod
    def _require_components(model, components: dict, names: tuple[str, ...]) -> None:
        """For a model other than GPA: raise unless the stock pipeline's `names` are among `components`."""
        missing = [name for name in names if components.get(name) is None]
        if missing:
            needed = ", ".join(f"{name}=" for name in missing)
            raise ValueError(f"this pipeline needs {needed} for a {type(model).__name__}: pass them to pipeline()")

    def _setup_gpa(self) -> None:
        if not isinstance(self.processor, GpaProcessor):
            self.processor = GpaProcessor.from_pretrained(self.model.name_or_path)

    def _gpa_call(self, inputs, batch_size: int | None, **kwargs):
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        batch_size = batch_size or getattr(self, "_batch_size", None) or 1
        results = []
        for start in range(0, len(items), batch_size):
            results.extend(self._gpa_batch(items[start : start + batch_size], **kwargs))
        return results[0] if single else results

    def _generate(self, task: str, generate_kwargs: dict | None, **processor_kwargs):
        inputs = self.processor(task=task, **processor_kwargs)
        return self.model.generate(**inputs, task=task, **(generate_kwargs or {})), inputs["input_ids"].shape[1]

    @staticmethod
    def _audio_result(waveform: torch.Tensor, sampling_rate: int) -> dict:
        return {"audio": waveform.numpy().astype(np.float32), "sampling_rate": sampling_rate}


class GpaTextToAudioPipeline(GpaPipelineMixin, TextToAudioPipeline):
    """`pipeline("text-to-speech")`: `tts(text, voice=None, generate_kwargs=None)` -> `{"audio", "sampling_rate"}`.

    `voice` is an audio file, array dict, `GpaVoice` or voice file; the model's default voice when omitted. Long
    text is split at sentence ends, the pieces generated as one batch, and their audio joined.
    """

    _load_tokenizer = None  # required for other models in `__init__`

    def __init__(self, model, *args, **kwargs):
        self.is_gpa = isinstance(model, GpaForConditionalGeneration)
        if not self.is_gpa:
            self._require_components(model, kwargs, ("tokenizer",))
        super().__init__(model, *args, **kwargs)
        if self.is_gpa:
            self._setup_gpa()

    def __call__(self, text_inputs, voice=None, generate_kwargs=None, batch_size=None, **kwargs):
        if not self.is_gpa:
            return super().__call__(text_inputs, **kwargs)
        if kwargs:
            raise ValueError(f"unknown arguments for GPA text-to-speech: {sorted(kwargs)}; use generate_kwargs=")
        return self._gpa_call(text_inputs, batch_size, voice=voice, generate_kwargs=generate_kwargs)

    def _gpa_batch(self, texts: Sequence[str], voice, generate_kwargs) -> list[dict]:
        pieces, owners = [], []
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text-to-speech needs non-empty text, got {text!r}")
            for piece in split_sentences(text):
                pieces.append(piece)
                owners.append(index)
        voices = voice if isinstance(voice, (list, tuple)) else [voice] * len(texts)
        if len(voices) != len(texts):
            raise ValueError(f"got {len(voices)} voices for {len(texts)} texts")
        piece_voices = [voices[owner] for owner in owners]
        if all(v is None for v in piece_voices):
            piece_voices = None
        output, _ = self._generate(
            "tts", {**(generate_kwargs or {}), "output_audio": True}, text=pieces, voice=piece_voices
        )
        joined = [[] for _ in texts]
        for owner, waveform in zip(owners, output.audio):
            joined[owner].append(waveform)
        rate = self.model.config.sampling_rate
        return [self._audio_result(torch.cat(parts), rate) for parts in joined]


class GpaAutomaticSpeechRecognitionPipeline(GpaPipelineMixin, AutomaticSpeechRecognitionPipeline):
    """`pipeline("automatic-speech-recognition")` for GPA: `asr(audio)` -> `{"text"}`.

    Audio of any length: the GLM tokenizer reads it in 30 s pieces and the length budget follows the duration.
    """

    _load_tokenizer = _load_feature_extractor = None  # required for other models in `__init__`

    def __init__(self, model, *args, **kwargs):
        self.is_gpa = isinstance(model, GpaForConditionalGeneration)
        if self.is_gpa:
            Pipeline.__init__(self, model, *args, **kwargs)
            self.type = "gpa"
            self._setup_gpa()
        else:
            self._require_components(model, kwargs, ("tokenizer", "feature_extractor"))
            super().__init__(model, *args, **kwargs)

    def __call__(self, inputs, generate_kwargs=None, batch_size=None, sampling_rate=None, **kwargs):
        if not self.is_gpa:
            return super().__call__(inputs, **kwargs)
        if kwargs:
            raise ValueError(f"unknown arguments for GPA speech recognition: {sorted(kwargs)}; use generate_kwargs=")
        return self._gpa_call(inputs, batch_size, generate_kwargs=generate_kwargs, sampling_rate=sampling_rate)

    def _gpa_batch(self, audio: Sequence, generate_kwargs, sampling_rate) -> list[dict]:
        sequences, prompt_length = self._generate(
            "asr", generate_kwargs, audio=list(audio), sampling_rate=sampling_rate
        )
        return [{"text": self.processor.decode_text(s[prompt_length:])} for s in sequences]


class GpaVoiceConversionPipeline(GpaPipelineMixin, Pipeline):
    """`pipeline("voice-conversion")`: `vc(source_audio, voice=target)` -> `{"audio", "sampling_rate"}`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, GpaForConditionalGeneration):
            raise ValueError(f"voice-conversion needs a GPA model, got {type(self.model).__name__}")
        self._setup_gpa()

    def __call__(self, inputs, voice=None, generate_kwargs=None, batch_size=None, sampling_rate=None, **kwargs):
        if kwargs:
            raise ValueError(f"unknown arguments for voice conversion: {sorted(kwargs)}; use generate_kwargs=")
        return self._gpa_call(
            inputs, batch_size, voice=voice, generate_kwargs=generate_kwargs, sampling_rate=sampling_rate
        )

    def _gpa_batch(self, sources: Sequence, voice, generate_kwargs, sampling_rate) -> list[dict]:
        output, _ = self._generate(
            "vc",
            {**(generate_kwargs or {}), "output_audio": True},
            audio=list(sources),
            voice=voice,
            sampling_rate=sampling_rate,
        )
        return [self._audio_result(w, self.model.config.sampling_rate) for w in output.audio]

    # The generic Pipeline steps are unused: `__call__` runs the batches itself.
    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def preprocess(self, inputs):
        raise NotImplementedError

    def _forward(self, model_inputs):
        raise NotImplementedError

    def postprocess(self, model_outputs):
        raise NotImplementedError


def register_pipelines() -> None:
    """Point the stock tasks at the GPA-aware subclasses and add `voice-conversion`."""
    tasks = PIPELINE_REGISTRY.supported_tasks
    tasks["text-to-audio"]["impl"] = GpaTextToAudioPipeline
    asr = tasks["automatic-speech-recognition"]
    asr["impl"] = GpaAutomaticSpeechRecognitionPipeline
    if AutoModelForCausalLM not in asr["pt"]:
        asr["pt"] = (*asr["pt"], AutoModelForCausalLM)
    if "voice-conversion" not in tasks:
        PIPELINE_REGISTRY.register_pipeline(
            "voice-conversion",
            pipeline_class=GpaVoiceConversionPipeline,
            pt_model=AutoModelForTextToWaveform,
            type="audio",
        )


__all__ = [
    "GpaAutomaticSpeechRecognitionPipeline",
    "GpaTextToAudioPipeline",
    "GpaVoiceConversionPipeline",
    "register_pipelines",
    "split_sentences",
]
