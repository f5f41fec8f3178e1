"""Pipelines: `pipeline("text-to-speech" | "automatic-speech-recognition" | "voice-conversion", model=GPA)`.

The stock text-to-audio and ASR pipelines feed a model raw text or features; GPA needs task prompts with audio
codes written in. The classes below subclass the stock pipelines and take over only for GPA models (any other
model runs the stock code path unchanged); `voice-conversion` is a new task.
"""

from __future__ import annotations

import numpy as np
from transformers import (
    AutomaticSpeechRecognitionPipeline,
    AutoModelForCausalLM,
    AutoModelForTextToWaveform,
    Pipeline,
    TextToAudioPipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling_gpa import GpaForConditionalGeneration
from .processing_gpa import GpaProcessor, run_requests

DEFAULT_PIECES_PER_BATCH = 8


class GpaPipelineMixin:
    """Runs GPA requests through [`run_requests`]: each cut into the pieces one prompt takes (text at sentence ends,
    audio at pauses), the pieces generated in batches of `batch_size` (default 8), and their outputs joined per
    request.

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

    def _gpa_call(self, task: str, inputs, batch_size: int | None, generate_kwargs: dict | None, **request):
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        batch_size = batch_size or getattr(self, "_batch_size", None) or DEFAULT_PIECES_PER_BATCH
        request["text" if task == "tts" else "audio"] = items
        outputs = run_requests(self.model, self.processor, task, batch_size, generate_kwargs, **request)
        if task == "asr":
            results = [{"text": text} for text in outputs]
        else:
            rate = self.model.config.sampling_rate
            results = [{"audio": waveform.numpy().astype(np.float32), "sampling_rate": rate} for waveform in outputs]
        return results[0] if single else results


class GpaTextToAudioPipeline(GpaPipelineMixin, TextToAudioPipeline):
    """`pipeline("text-to-speech")`: `tts(text, voice=None, generate_kwargs=None)` -> `{"audio", "sampling_rate"}`.

    `voice` is an audio file, array dict, `GpaVoice` or voice file (or one per text); the model's default voice when
    omitted. Text longer than one prompt takes is cut at sentence ends, and the pieces' audio joined.
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
        return self._gpa_call("tts", text_inputs, batch_size, generate_kwargs, voice=voice)


class GpaAutomaticSpeechRecognitionPipeline(GpaPipelineMixin, AutomaticSpeechRecognitionPipeline):
    """`pipeline("automatic-speech-recognition")` for GPA: `asr(audio)` -> `{"text"}`.

    Audio of any length: longer than one prompt takes (`processor.max_source_seconds`), it is cut at pauses and the
    pieces' transcripts joined.
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
        return self._gpa_call("asr", inputs, batch_size, generate_kwargs, sampling_rate=sampling_rate)


class GpaVoiceConversionPipeline(GpaPipelineMixin, Pipeline):
    """`pipeline("voice-conversion")`: `vc(source_audio, voice=target)` -> `{"audio", "sampling_rate"}`.

    A source longer than one prompt takes is cut at pauses, and the pieces' converted audio joined.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, GpaForConditionalGeneration):
            raise ValueError(f"voice-conversion needs a GPA model, got {type(self.model).__name__}")
        self._setup_gpa()

    def __call__(self, inputs, voice=None, generate_kwargs=None, batch_size=None, sampling_rate=None, **kwargs):
        if kwargs:
            raise ValueError(f"unknown arguments for voice conversion: {sorted(kwargs)}; use generate_kwargs=")
        return self._gpa_call("vc", inputs, batch_size, generate_kwargs, voice=voice, sampling_rate=sampling_rate)

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
]
