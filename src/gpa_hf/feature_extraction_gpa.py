"""One feature extractor for GPA: the BiCodec front end and the GLM-4-Voice (Whisper) features, from one config."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import BatchFeature, SequenceFeatureExtractor

from .audio_utils import AudioInput, load_audio
from .feature_extraction_bicodec import BiCodecFeatureExtractor
from .feature_extraction_glm_speech_tokenizer import GlmSpeechTokenizerFeatureExtractor


class GpaFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Audio front end of [`GpaProcessor`]. It holds the settings of both audio tokenizers and produces:

    - `source_values`, `source_attention_mask`: BiCodec (wav2vec2) inputs of source audio (semantic tokens);
    - `glm_input_features`, `glm_attention_mask`, `glm_audio_index`: GLM tokenizer inputs (ASR);
    - `reference_values`: speaker reference clips (global tokens of a voice).
    """

    model_input_names = ["source_values", "source_attention_mask", "glm_input_features", "reference_values"]

    def __init__(
        self,
        sampling_rate: int = 16000,
        hop_length: int = 320,
        reference_length: int = 96000,
        volume_normalize: bool = True,
        volume_coefficient: float = 0.2,
        glm_feature_size: int = 128,
        glm_hop_length: int = 160,
        glm_n_fft: int = 400,
        glm_chunk_length: int = 30,
        glm_pad_to_multiple_of: int = 1280,
        **kwargs,
    ):
        kwargs.pop("feature_size", None)
        kwargs.pop("padding_value", None)
        super().__init__(feature_size=1, sampling_rate=sampling_rate, padding_value=0.0, **kwargs)
        self.hop_length = hop_length
        self.reference_length = reference_length
        self.volume_normalize = volume_normalize
        self.volume_coefficient = volume_coefficient
        self.glm_feature_size = glm_feature_size
        self.glm_hop_length = glm_hop_length
        self.glm_n_fft = glm_n_fft
        self.glm_chunk_length = glm_chunk_length
        self.glm_pad_to_multiple_of = glm_pad_to_multiple_of
        self.bicodec = BiCodecFeatureExtractor(
            sampling_rate=sampling_rate,
            hop_length=hop_length,
            reference_length=reference_length,
            volume_normalize=volume_normalize,
            volume_coefficient=volume_coefficient,
        )
        self.glm = GlmSpeechTokenizerFeatureExtractor(
            feature_size=glm_feature_size,
            sampling_rate=sampling_rate,
            hop_length=glm_hop_length,
            n_fft=glm_n_fft,
            chunk_length=glm_chunk_length,
            pad_to_multiple_of=glm_pad_to_multiple_of,
        )

    @classmethod
    def from_codec_feature_extractors(
        cls, bicodec: BiCodecFeatureExtractor, glm: GlmSpeechTokenizerFeatureExtractor
    ) -> GpaFeatureExtractor:
        """Combine the front ends of the two audio tokenizers, keeping every setting of each."""
        return cls(
            sampling_rate=bicodec.sampling_rate,
            hop_length=bicodec.hop_length,
            reference_length=bicodec.reference_length,
            volume_normalize=bicodec.volume_normalize,
            volume_coefficient=bicodec.volume_coefficient,
            glm_feature_size=glm.feature_size,
            glm_hop_length=glm.hop_length,
            glm_n_fft=glm.n_fft,
            glm_chunk_length=glm.chunk_length,
            glm_pad_to_multiple_of=glm.pad_to_multiple_of,
        )

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("bicodec", None)
        output.pop("glm", None)
        return output

    def semantic_length(self, num_samples: int) -> int:
        """Semantic tokens for a 16 kHz clip of `num_samples` (the wav2vec2 conv stack's output length)."""
        return (num_samples - self.bicodec.min_samples) // self.hop_length + 1

    def glm_length(self, num_samples: int) -> int:
        """GLM tokens for a 16 kHz clip of `num_samples`, counted piece by piece as the tokenizer cuts it."""
        piece, per_token = self.glm.n_samples, self.glm_pad_to_multiple_of
        full, rest = divmod(num_samples, piece)
        return full * (piece // per_token) + -(-rest // per_token)

    def source_features(
        self, audio: Sequence[AudioInput], sampling_rate: int | None = None, with_glm: bool = False
    ) -> tuple[BatchFeature, list[int], list[int]]:
        """Features of source clips, and their semantic and GLM token counts (each clip is decoded once)."""
        audio = [load_audio(item, sampling_rate, self.sampling_rate) for item in audio]
        sampling_rate = self.sampling_rate
        bicodec = self.bicodec(audio, sampling_rate=sampling_rate, return_reference=False)
        samples = bicodec["attention_mask"].sum(-1).tolist()
        data = {"source_values": bicodec["input_values"], "source_attention_mask": bicodec["attention_mask"]}
        glm_counts = []
        if with_glm:
            glm = self.glm(list(audio), sampling_rate=sampling_rate)
            data.update(
                glm_input_features=glm["input_features"],
                glm_attention_mask=glm["attention_mask"],
                glm_audio_index=glm["audio_index"],
            )
            glm_counts = [self.glm_length(n) for n in samples]
        return BatchFeature(data), [self.semantic_length(n) for n in samples], glm_counts

    def reference_features(self, audio: Sequence[AudioInput], sampling_rate: int | None = None) -> BatchFeature:
        return self.bicodec.speaker_inputs(list(audio), sampling_rate=sampling_rate)

    def __call__(self, audio: AudioInput | Sequence[AudioInput], sampling_rate: int | None = None, **kwargs):
        """Source features (BiCodec + GLM) of `audio`."""
        items = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        return self.source_features(items, sampling_rate, with_glm=True)[0]


__all__ = ["GpaFeatureExtractor"]
