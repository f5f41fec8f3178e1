"""Configuration of BiCodec, the semantic + speaker audio codec that GPA speaks through."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# wav2vec2-large-xlsr-53, the semantic feature model of the published BiCodec.
XLSR_53_CONFIG = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "conv_dim": [512] * 7,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "conv_bias": True,
    "feat_proj_dropout": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "layerdrop": 0.0,
    "mask_time_prob": 0.0,
}


def semantic_receptive_field(hop_length: int) -> int:
    """Samples behind the first semantic token: hop + hop / 4, as wav2vec2's conv stack (400 published).

    A function of the hop alone, so that the feature extractor, which has no config, counts tokens the same way.
    """
    return hop_length + hop_length // 4


class BiCodecConfig(PreTrainedConfig):
    r"""
    Configuration of [`BiCodecModel`]. Defaults are the published GPA / Spark-TTS BiCodec.

    BiCodec turns 16 kHz speech into two token streams: semantic tokens (one per `hop_length` samples, from
    wav2vec2 features) and a fixed number of global (speaker) tokens (from a mel spectrogram of a reference clip);
    and decodes the pair back to a waveform.

    Args:
        sampling_rate: audio rate in Hz.
        hop_length: samples per semantic token.
        reference_duration: seconds of the speaker reference clip (its start, tiled when shorter).
        volume_normalize: whether the front end applies BiCodec's loudness normalisation.
        volume_coefficient: target loudness of that normalisation.
        semantic_model_config: config of the wav2vec2 semantic feature model.
        semantic_hidden_layers: the wav2vec2 hidden states whose mean is the semantic feature.
        hidden_size: width of the latent space (feature encoder output, quantizer input, decoder input) and of the
            speaker d-vector.
        encoder_vocos_dim / encoder_intermediate_size / encoder_num_layers: ConvNeXt (Vocos) feature encoder sizes.
        encoder_num_stages: count of the extra 2-layer ConvNeXt stages after the main encoder (`sample_ratios`).
        codebook_size / codebook_dim: semantic factorized VQ.
        mel_n_fft / mel_win_length / mel_hop_length / mel_fmin / mel_fmax / num_mel_bins: linear-magnitude mel
            spectrogram of the speaker path.
        ecapa_channels: channels of the ECAPA-TDNN speaker encoder (512 published).
        ecapa_output_channels: width of the ECAPA latent that the perceiver reads (1536 published).
        speaker_latent_dim: width of the perceiver latents and of the FSQ input.
        num_global_tokens: global tokens per utterance.
        perceiver_depth / perceiver_heads / perceiver_head_dim / perceiver_ff_mult: perceiver resampler sizes.
        fsq_levels: levels of the speaker finite scalar quantizer (codebook = their product).
        prenet_vocos_dim / prenet_intermediate_size / prenet_num_layers / prenet_num_stages: decoder prenet sizes.
        decoder_channels / upsampling_rates / decoder_kernel_sizes: the DAC-style wave generator.
        include_semantic_encoder: build wav2vec2 and the feature encoder. Set to `False` for decode + speaker
            encoding only (text-to-speech), which then loads neither.
        harmonic_count: harmonics of a sine synthesiser added to the wave generator's output, at the pitch a head
            predicts from the decoder input (0: none, as published). A small wave generator trained briefly makes
            noisy, barely periodic audio; the synthesiser makes voiced frames periodic from the start.
        magnitude_n_fft: frame length (Hann window) of a spectral magnitude refiner (0: none, as published). A head
            predicts each frame's log-magnitude spectrum from the decoder input, and the decoded audio takes that
            magnitude while keeping its own phase. A small wave generator trained with mel losses renders an
            averaged spectrum that loses much of the voice; a spectrum regressed directly keeps it.
        magnitude_hop_length: samples between the refiner's frames (must divide `hop_length`).
        magnitude_dim / magnitude_num_layers: width and ConvNeXt layers of the refiner's head.
    """

    model_type = "bicodec"
    sub_configs_defaults = {
        "semantic_model_config": SubConfigSpec(
            config_class=AutoConfig, model_type="wav2vec2", init_kwargs=XLSR_53_CONFIG
        ),
    }

    sampling_rate: int = 16000
    hop_length: int = 320
    reference_duration: float = 6.0
    volume_normalize: bool = True
    volume_coefficient: float = 0.2
    semantic_model_config: dict | PreTrainedConfig | None = None
    semantic_hidden_layers: list[int] | tuple[int, ...] = (11, 14, 16)
    hidden_size: int = 1024
    encoder_vocos_dim: int = 384
    encoder_intermediate_size: int = 2048
    encoder_num_layers: int = 12
    encoder_num_stages: int = 2
    codebook_size: int = 8192
    codebook_dim: int = 8
    mel_n_fft: int = 1024
    mel_win_length: int = 640
    mel_hop_length: int = 320
    mel_fmin: float = 10.0
    mel_fmax: float | None = None
    num_mel_bins: int = 128
    ecapa_channels: int = 512
    ecapa_output_channels: int = 1536
    speaker_latent_dim: int = 128
    num_global_tokens: int = 32
    perceiver_depth: int = 2
    perceiver_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_ff_mult: int = 4
    fsq_levels: list[int] | tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    prenet_vocos_dim: int = 384
    prenet_intermediate_size: int = 2048
    prenet_num_layers: int = 12
    prenet_num_stages: int = 2
    decoder_channels: int = 1536
    upsampling_rates: list[int] | tuple[int, ...] = (8, 5, 4, 2)
    decoder_kernel_sizes: list[int] | tuple[int, ...] = (16, 11, 8, 4)
    include_semantic_encoder: bool = True
    harmonic_count: int = 0
    magnitude_n_fft: int = 0
    magnitude_hop_length: int = 160
    magnitude_dim: int = 256
    magnitude_num_layers: int = 6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.semantic_hidden_layers = list(self.semantic_hidden_layers)
        self.fsq_levels = list(self.fsq_levels)
        self.upsampling_rates = list(self.upsampling_rates)
        self.decoder_kernel_sizes = list(self.decoder_kernel_sizes)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Checks that the sizes describe a buildable codec with `hop_length` samples per token."""
        if len(self.upsampling_rates) != len(self.decoder_kernel_sizes):
            raise ValueError(
                f"upsampling_rates {self.upsampling_rates} and decoder_kernel_sizes {self.decoder_kernel_sizes} "
                "must have the same length"
            )
        for rate, kernel in zip(self.upsampling_rates, self.decoder_kernel_sizes):
            if kernel < rate or (kernel - rate) % 2:
                raise ValueError(
                    f"decoder kernel {kernel} with stride {rate}: kernel - stride must be even and >= 0 so that "
                    "each block upsamples exactly by its stride"
                )
        product = 1
        for rate in self.upsampling_rates:
            product *= rate
        if product != self.hop_length:
            raise ValueError(f"upsampling_rates multiply to {product}, expected hop_length={self.hop_length}")
        if self.decoder_channels % 2 ** len(self.upsampling_rates):
            raise ValueError(
                f"decoder_channels={self.decoder_channels} must be divisible by 2**{len(self.upsampling_rates)}"
            )
        if self.harmonic_count < 0:
            raise ValueError(f"harmonic_count must be >= 0 (0: no harmonic synthesiser), got {self.harmonic_count}")
        if self.magnitude_n_fft < 0:
            raise ValueError(f"magnitude_n_fft must be >= 0 (0: no magnitude refiner), got {self.magnitude_n_fft}")
        if self.magnitude_n_fft and (
            self.hop_length % self.magnitude_hop_length or self.magnitude_n_fft % self.magnitude_hop_length
        ):
            raise ValueError(
                f"magnitude_hop_length={self.magnitude_hop_length} must divide hop_length={self.hop_length} and "
                f"magnitude_n_fft={self.magnitude_n_fft}"
            )
        if self.ecapa_channels % 8:
            raise ValueError(f"ecapa_channels={self.ecapa_channels} must be divisible by the Res2Net scale 8")
        semantic = self.semantic_model_config
        if semantic is not None:
            # Token counts are computed from hop_length alone where wav2vec2 is not loaded (TTS-only models, the
            # feature extractor): its conv stack must step by hop_length over a hop + hop / 4 receptive field.
            stride, receptive_field = 1, 1
            for kernel, step in zip(semantic.conv_kernel, semantic.conv_stride):
                receptive_field += (kernel - 1) * stride
                stride *= step
            expected = (self.hop_length, self.semantic_receptive_field)
            if (stride, receptive_field) != expected:
                raise ValueError(
                    f"the semantic model's convolutions step {stride} samples over a {receptive_field}-sample "
                    f"receptive field; hop_length={self.hop_length} needs {expected[0]} over {expected[1]}"
                )

    @property
    def semantic_receptive_field(self) -> int:
        """Samples behind the first semantic token at this config's hop (`semantic_receptive_field`)."""
        return semantic_receptive_field(self.hop_length)

    @property
    def reference_length(self) -> int:
        """Samples of the speaker reference clip: whole tokens of `reference_duration` seconds (96000 published)."""
        return int(self.sampling_rate * self.reference_duration) // self.hop_length * self.hop_length

    @property
    def global_codebook_size(self) -> int:
        size = 1
        for level in self.fsq_levels:
            size *= level
        return size


__all__ = ["BiCodecConfig"]
