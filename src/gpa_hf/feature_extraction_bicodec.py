"""BiCodec front end: loudness normalisation, wav2vec2 input normalisation and the speaker reference clip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import BatchFeature, SequenceFeatureExtractor

from .audio_utils import AudioInput, load_audio
from .configuration_bicodec import semantic_receptive_field


def volume_normalize(audio: np.ndarray, coefficient: float = 0.2) -> np.ndarray:
    """BiCodec's loudness normalisation, as the published model was trained with.

    Quiet audio (peak < 0.1) is first boosted to a 0.1 peak; then the gain that brings the mean of the 90th-99th
    percentile of |x| (over samples above 0.01) to `coefficient` is applied, clamped to [0.1, 10], and the peak
    is limited to 1. As in the trained front end, the percentile statistics are taken before the boost.
    """
    magnitudes = np.sort(np.abs(audio))
    if magnitudes[-1] < 0.1:
        audio = audio / max(magnitudes[-1], 1e-3) * 0.1
    magnitudes = magnitudes[magnitudes > 0.01]
    count = magnitudes.shape[0]
    if count <= 10:
        return audio
    volume = np.mean(magnitudes[int(0.9 * count) : int(0.99 * count)])
    audio = audio * np.clip(coefficient / volume, 0.1, 10)
    peak = np.max(np.abs(audio))
    return audio / peak if peak > 1 else audio


def reference_clip(audio: np.ndarray, length: int) -> np.ndarray:
    """The first `length` samples, the clip tiled when shorter (a fixed segment, never random)."""
    if audio.shape[0] >= length:
        return audio[:length]
    return np.tile(audio, length // audio.shape[0] + 1)[:length]


class BiCodecFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns audio into [`BiCodecModel`] inputs.

    Every clip is loaded with [`gpa_hf.audio_utils.load_audio`] (mono, 16 kHz), loudness-normalised, then:
    - `input_values`: normalised to zero mean and unit variance over the clip's own samples, right-padded with 0;
    - `attention_mask`: 1 on each clip's samples;
    - `reference_values`: the speaker reference clip (`reference_length` samples), taken from the normalised clip.
    """

    model_input_names = ["input_values", "attention_mask", "reference_values"]

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = 16000,
        hop_length: int = 320,
        reference_length: int = 96000,
        volume_normalize: bool = True,
        volume_coefficient: float = 0.2,
        padding_value: float = 0.0,
        **kwargs,
    ):
        if feature_size != 1:
            raise ValueError(f"BiCodec reads mono waveforms: feature_size must be 1, got {feature_size}")
        super().__init__(feature_size=1, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.hop_length = hop_length
        self.reference_length = reference_length
        self.volume_normalize = volume_normalize
        self.volume_coefficient = volume_coefficient

    @property
    def min_samples(self) -> int:
        """The shortest clip that yields one semantic token (400 samples published)."""
        return semantic_receptive_field(self.hop_length)

    def prepare_waveform(self, audio: AudioInput, sampling_rate: int | None = None) -> np.ndarray:
        """Load + loudness-normalise one clip: the waveform the codec's front end actually sees."""
        waveform = load_audio(audio, sampling_rate, self.sampling_rate)
        return volume_normalize(waveform, self.volume_coefficient) if self.volume_normalize else waveform

    def speaker_reference(self, waveform: np.ndarray, name: str = "audio") -> np.ndarray:
        if not np.any(waveform):
            raise ValueError(f"{name}: the audio is silent (all zeros); a voice needs speech to take a speaker from")
        return reference_clip(waveform, self.reference_length)

    def __call__(
        self,
        audio: AudioInput | Sequence[AudioInput],
        sampling_rate: int | None = None,
        return_reference: bool = True,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """`audio` is one input or a list; `sampling_rate` is the rate of array inputs."""
        if isinstance(audio, (list, tuple)):
            if not audio:
                raise ValueError("no audio given: expected at least one clip")
            items = list(audio)
        else:
            items = [audio]
        waveforms = [self.prepare_waveform(item, sampling_rate) for item in items]
        for index, waveform in enumerate(waveforms):
            if waveform.shape[0] < self.min_samples:
                raise ValueError(
                    f"audio #{index} is {waveform.shape[0]} samples long; at least {self.min_samples} samples "
                    f"({self.min_samples / self.sampling_rate * 1000:.0f} ms at {self.sampling_rate} Hz) make a token"
                )
        normalized = [(w - w.mean()) / np.sqrt(w.var() + 1e-7) for w in waveforms]
        longest = max(w.shape[0] for w in normalized)
        input_values = np.full((len(normalized), longest), self.padding_value, dtype=np.float32)
        attention_mask = np.zeros((len(normalized), longest), dtype=np.int64)
        for index, values in enumerate(normalized):
            input_values[index, : values.shape[0]] = values
            attention_mask[index, : values.shape[0]] = 1
        data = {"input_values": input_values, "attention_mask": attention_mask}
        if return_reference:
            data["reference_values"] = np.stack(
                [self.speaker_reference(w, f"audio #{i}") for i, w in enumerate(waveforms)]
            ).astype(np.float32)
        return BatchFeature(data, tensor_type=return_tensors)

    def speaker_inputs(
        self, audio: AudioInput | Sequence[AudioInput], sampling_rate: int | None = None, return_tensors: str = "pt"
    ) -> BatchFeature:
        """Only the speaker reference clips, for global tokens without the semantic path."""
        items = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        clips = [
            self.speaker_reference(self.prepare_waveform(item, sampling_rate), f"audio #{i}")
            for i, item in enumerate(items)
        ]
        return BatchFeature({"reference_values": np.stack(clips).astype(np.float32)}, tensor_type=return_tensors)


__all__ = ["BiCodecFeatureExtractor", "reference_clip", "volume_normalize"]
