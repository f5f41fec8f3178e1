"""Whisper log-mel features for the GLM-4-Voice tokenizer, cut into 30 s pieces instead of truncated."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, WhisperFeatureExtractor

from .audio_utils import AudioInput, load_audio


class GlmSpeechTokenizerFeatureExtractor(WhisperFeatureExtractor):
    r"""
    whisper-large-v3 features (128 mels) for [`GlmSpeechTokenizerModel`].

    Each clip is loaded with [`gpa_hf.audio_utils.load_audio`], cut into pieces of at most `chunk_length` seconds
    (the encoder's position table), and each piece is featurized on its own, padded to a multiple of
    `pad_to_multiple_of` samples (one token). Rows are then stacked; `audio_index` says which clip each row
    belongs to, so a batch gives every clip exactly the tokens it gets alone, and nothing past 30 s is dropped.
    """

    model_input_names = ["input_features", "attention_mask", "audio_index"]

    def __init__(self, feature_size: int = 128, pad_to_multiple_of: int = 1280, **kwargs):
        kwargs.pop("return_attention_mask", None)
        super().__init__(feature_size=feature_size, return_attention_mask=True, **kwargs)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _featurize_piece(self, piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = super().__call__(
            piece,
            sampling_rate=self.sampling_rate,
            padding="longest",
            pad_to_multiple_of=self.pad_to_multiple_of,
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
            device="cpu",
        )
        return features["input_features"][0], features["attention_mask"][0]

    def __call__(
        self,
        audio: AudioInput | Sequence[AudioInput],
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        items = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if not items:
            raise ValueError("no audio given: expected at least one clip")
        piece_samples = self.n_samples
        features, masks, owners = [], [], []
        for index, item in enumerate(items):
            waveform = load_audio(item, sampling_rate, self.sampling_rate)
            for start in range(0, waveform.shape[0], piece_samples):
                piece_features, piece_mask = self._featurize_piece(waveform[start : start + piece_samples])
                features.append(piece_features)
                masks.append(piece_mask)
                owners.append(index)
        frames = max(f.shape[-1] for f in features)
        input_features = np.zeros((len(features), self.feature_size, frames), dtype=np.float32)
        attention_mask = np.zeros((len(features), frames), dtype=np.int64)
        for row, (piece_features, piece_mask) in enumerate(zip(features, masks)):
            input_features[row, :, : piece_features.shape[-1]] = piece_features
            attention_mask[row, : piece_mask.shape[0]] = piece_mask
        data = {"input_features": input_features, "attention_mask": attention_mask, "audio_index": np.array(owners)}
        batch = BatchFeature(data, tensor_type=return_tensors)
        if return_tensors == "pt":
            batch["audio_index"] = torch.as_tensor(owners, dtype=torch.long)
        return batch


__all__ = ["GlmSpeechTokenizerFeatureExtractor"]
