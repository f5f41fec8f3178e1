"""Configuration of the GLM-4-Voice speech tokenizer (a Whisper-VQ encoder), the 12.5 Hz ASR token stream of GPA."""

from __future__ import annotations

from transformers import PreTrainedConfig


class GlmSpeechTokenizerConfig(PreTrainedConfig):
    r"""
    Configuration of [`GlmSpeechTokenizerModel`]. Defaults are the published `glm-4-voice-tokenizer`.

    The model is the first `num_hidden_layers` layers of a whisper-large-v3 encoder with a causal conv stem and
    block-causal attention, followed by average pooling and a nearest-neighbour codebook.

    Args:
        num_mel_bins: log-mel bins of the input features.
        d_model / encoder_attention_heads / encoder_ffn_dim: Whisper encoder sizes.
        num_hidden_layers: encoder layers kept before pooling and quantisation (`quantize_position`).
        max_source_positions: positions after the conv stem (1500 = 30 s); longer audio is tokenized in pieces.
        attention_block_size: frames per block of the block-causal attention mask (200 = 4 s).
        pooling_kernel_size: average-pooling factor after the last layer (50 Hz -> 12.5 Hz).
        codebook_size: entries of the VQ codebook.
        sampling_rate / hop_length / n_fft / chunk_length: the Whisper feature extractor settings.
    """

    model_type = "glm_speech_tokenizer"

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_hidden_layers: int = 16
    max_source_positions: int = 1500
    attention_block_size: int = 200
    pooling_kernel_size: int = 4
    codebook_size: int = 16384
    activation_function: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30
    initializer_range: float = 0.02

    @property
    def samples_per_token(self) -> int:
        """Audio samples per token: hop x conv stride 2 x pooling (1280 published, 12.5 tokens/s)."""
        return self.hop_length * 2 * self.pooling_kernel_size

    @property
    def max_chunk_samples(self) -> int:
        """The longest piece the position table covers (30 s published)."""
        return self.max_source_positions * 2 * self.hop_length


__all__ = ["GlmSpeechTokenizerConfig"]
