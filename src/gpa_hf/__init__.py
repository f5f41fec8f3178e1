"""gpa-hf: GPA (General-Purpose Audio) as a Hugging Face transformers model."""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTextToWaveform,
    AutoProcessor,
)

from .audio_utils import load_audio, write_wav
from .configuration_bicodec import BiCodecConfig
from .configuration_glm_speech_tokenizer import GlmSpeechTokenizerConfig
from .configuration_gpa import GpaConfig, GpaVocabularyLayout
from .data_gpa import (
    GpaDataCollator,
    PreparationReport,
    add_semantic_input_noise,
    load_jsonl_dataset,
    prepare_dataset,
)
from .default_model import DEFAULT_MODEL
from .feature_extraction_bicodec import BiCodecFeatureExtractor
from .feature_extraction_glm_speech_tokenizer import GlmSpeechTokenizerFeatureExtractor
from .feature_extraction_gpa import GpaFeatureExtractor
from .modeling_bicodec import BiCodecDecoderOutput, BiCodecEncoderOutput, BiCodecModel, BiCodecPitchOutput
from .modeling_glm_speech_tokenizer import GlmSpeechTokenizerModel, GlmSpeechTokenizerOutput
from .modeling_gpa import GpaForConditionalGeneration, GpaGenerateOutput
from .processing_gpa import GpaProcessor, GpaVoice

AutoConfig.register(BiCodecConfig.model_type, BiCodecConfig, exist_ok=True)
AutoConfig.register(GlmSpeechTokenizerConfig.model_type, GlmSpeechTokenizerConfig, exist_ok=True)
AutoModel.register(BiCodecConfig, BiCodecModel, exist_ok=True)
AutoModel.register(GlmSpeechTokenizerConfig, GlmSpeechTokenizerModel, exist_ok=True)
AutoFeatureExtractor.register(BiCodecConfig, BiCodecFeatureExtractor, exist_ok=True)
AutoFeatureExtractor.register(GlmSpeechTokenizerConfig, GlmSpeechTokenizerFeatureExtractor, exist_ok=True)
AutoConfig.register(GpaConfig.model_type, GpaConfig, exist_ok=True)
AutoModelForCausalLM.register(GpaConfig, GpaForConditionalGeneration, exist_ok=True)
AutoModelForTextToWaveform.register(GpaConfig, GpaForConditionalGeneration, exist_ok=True)
AutoFeatureExtractor.register(GpaConfig, GpaFeatureExtractor, exist_ok=True)
AutoProcessor.register(GpaConfig, GpaProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "BiCodecConfig",
    "BiCodecDecoderOutput",
    "BiCodecEncoderOutput",
    "BiCodecFeatureExtractor",
    "BiCodecModel",
    "BiCodecPitchOutput",
    "GlmSpeechTokenizerConfig",
    "GlmSpeechTokenizerFeatureExtractor",
    "GlmSpeechTokenizerModel",
    "GlmSpeechTokenizerOutput",
    "GpaConfig",
    "GpaDataCollator",
    "GpaFeatureExtractor",
    "GpaForConditionalGeneration",
    "GpaGenerateOutput",
    "GpaProcessor",
    "GpaTrainer",
    "GpaVocabularyLayout",
    "GpaVoice",
    "PreparationReport",
    "add_semantic_input_noise",
    "build_trainer",
    "load_audio",
    "load_jsonl_dataset",
    "prepare_dataset",
    "write_wav",
]

from .pipelines import register_pipelines  # noqa: E402

register_pipelines()

_TRAINING_NAMES = ("GpaTrainer", "build_trainer")


def __getattr__(name: str):
    """The training helpers import `transformers.Trainer` (0.3 s): loaded on first use, not with every command."""
    if name in _TRAINING_NAMES:
        from . import training_gpa

        return getattr(training_gpa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
