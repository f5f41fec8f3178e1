"""BiCodec: wav2vec2 semantic tokens at 50 Hz + 32 global speaker tokens, and a DAC-style decoder back to audio.

Layout follows the published BiCodec: a ConvNeXt (Vocos) feature encoder over wav2vec2 features with a factorized
cosine VQ; an ECAPA-TDNN + perceiver resampler + FSQ speaker tokenizer over a linear-magnitude mel spectrogram; a
speaker-conditioned ConvNeXt prenet and a DAC wave generator. Every sequence op honours a padding mask, so a batch
of clips gives each clip exactly what it gets alone. Beyond the published layout, an optional harmonic synthesiser
(`harmonic_count > 0`: a pitch head and sines at that pitch added to the wave generator's output) gives a small,
briefly trained decoder periodic voiced speech, and an optional magnitude refiner (`magnitude_n_fft > 0`) gives its
output a spectral magnitude predicted from the tokens and the voice, which keeps the voice better.
"""

import copy
import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.audio_utils import mel_filter_bank
from transformers.modeling_utils import PreTrainedAudioTokenizerBase
from transformers.models.dac.modeling_dac import DacResidualUnit, Snake1d
from transformers.utils import ModelOutput

from .configuration_bicodec import BiCodecConfig

# The reference's Encoder/Decoder stages use a "sampling block" with ratio 1, which returns x + x + x.
STAGE_GAIN = 3.0
# The pitch head's zero output: mid speech range, so that a head starts near every voice.
PITCH_REFERENCE_HZ = 150.0
# Harmonic amplitudes are HARMONIC_GAIN * softplus(head output + HARMONIC_OFFSET): non-negative, and an untrained head
# plays 0.007 per harmonic, about the level of loudness-normalised speech over 48 harmonics.
HARMONIC_GAIN = 0.01
HARMONIC_OFFSET = 0.0


@dataclass
class BiCodecEncoderOutput(ModelOutput):
    """
    Args:
        semantic_codes (`torch.LongTensor` of shape `(batch_size, frames)`): semantic token ids, padded with 0
            after each clip's `semantic_lengths`.
        semantic_lengths (`torch.LongTensor` of shape `(batch_size,)`): valid semantic tokens of each clip.
        global_codes (`torch.LongTensor` of shape `(batch_size, num_global_tokens)`): speaker token ids.
        semantic_features (`torch.FloatTensor` of shape `(batch_size, frames, semantic_hidden_size)`): the mean of
            the selected wav2vec2 hidden states.
        semantic_latents (`torch.FloatTensor` of shape `(batch_size, hidden_size, frames)`): feature encoder output.
        speaker_latents (`torch.FloatTensor` of shape `(batch_size, speaker_latent_dim, num_global_tokens)`):
            perceiver output before FSQ.
    """

    semantic_codes: torch.LongTensor | None = None
    semantic_lengths: torch.LongTensor | None = None
    global_codes: torch.LongTensor | None = None
    semantic_features: torch.FloatTensor | None = None
    semantic_latents: torch.FloatTensor | None = None
    speaker_latents: torch.FloatTensor | None = None


@dataclass
class BiCodecDecoderOutput(ModelOutput):
    """
    Args:
        audio_values (`torch.FloatTensor` of shape `(batch_size, samples)`): waveforms, zero after each clip's
            `audio_lengths`.
        audio_lengths (`torch.LongTensor` of shape `(batch_size,)`): `hop_length` samples per semantic token.
    """

    audio_values: torch.FloatTensor | None = None
    audio_lengths: torch.LongTensor | None = None


@dataclass
class BiCodecPitchOutput(ModelOutput):
    """
    Args:
        frequencies (`torch.FloatTensor` of shape `(batch_size, frames)`): the fundamental frequency (Hz) the
            harmonic synthesiser plays during each semantic token; predicted for unvoiced tokens too, where it only
            carries the phase on.
        voiced (`torch.BoolTensor` of shape `(batch_size, frames)`): tokens whose harmonics sound.
    """

    frequencies: torch.FloatTensor | None = None
    voiced: torch.BoolTensor | None = None


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """`(batch,)` lengths -> `(batch, 1, max_length)` float mask, 1 on valid frames."""
    positions = torch.arange(max_length, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).unsqueeze(1).float()


def mask_to_lengths(mask: torch.Tensor) -> torch.LongTensor:
    """`(batch, 1, frames)` mask -> `(batch,)` lengths, counted as integers (a bf16 sum rounds lengths past 256)."""
    return mask[:, 0].sum(-1, dtype=torch.long)


class BiCodecConditionProjection(nn.Linear):
    """A projection of the speaker d-vector that starts constant: zero weights, every bias `initial_bias`.

    Its own class so that `_init_weights` finds it: transformers skips the init of a module without direct
    parameters (such as a norm holding two of these), so the parent cannot initialise them.
    """

    def __init__(self, condition_dim: int, dim: int, initial_bias: float):
        super().__init__(condition_dim, dim)
        self.initial_bias = initial_bias


class BiCodecAdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters, then a scale and shift predicted from the speaker d-vector."""

    def __init__(self, condition_dim: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = BiCodecConditionProjection(condition_dim, dim, initial_bias=1.0)
        self.shift = BiCodecConditionProjection(condition_dim, dim, initial_bias=0.0)

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden_states = F.layer_norm(hidden_states, (hidden_states.shape[-1],), eps=self.eps)
        return hidden_states * self.scale(condition).unsqueeze(1) + self.shift(condition).unsqueeze(1)


class BiCodecConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_size: int, condition_dim: int | None = None):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = BiCodecAdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_size)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_size, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.dwconv(hidden_states * mask).transpose(1, 2)
        hidden_states = self.norm(hidden_states, condition) if condition is not None else self.norm(hidden_states)
        hidden_states = self.pwconv2(self.act(self.pwconv1(hidden_states)))
        return residual + (self.gamma * hidden_states).transpose(1, 2)


class BiCodecVocosBackbone(nn.Module):
    """Conv embedding + ConvNeXt blocks. Takes `(batch, channels, frames)`, returns `(batch, frames, dim)`."""

    def __init__(
        self, input_dim: int, dim: int, intermediate_size: int, num_layers: int, condition_dim: int | None = None
    ):
        super().__init__()
        self.embed = nn.Conv1d(input_dim, dim, kernel_size=7, padding=3)
        self.norm = BiCodecAdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(
            [BiCodecConvNeXtBlock(dim, intermediate_size, condition_dim) for _ in range(num_layers)]
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_states = self.embed(hidden_states * mask).transpose(1, 2)
        hidden_states = self.norm(hidden_states, condition) if condition is not None else self.norm(hidden_states)
        hidden_states = hidden_states.transpose(1, 2)
        for block in self.convnext:
            hidden_states = block(hidden_states, mask, condition)
        return self.final_layer_norm(hidden_states.transpose(1, 2))


class BiCodecFeatureEncoder(nn.Module):
    """wav2vec2 features `(batch, semantic_hidden, frames)` -> latents `(batch, hidden_size, frames)`."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        dim, inner = config.encoder_vocos_dim, config.encoder_intermediate_size
        self.encoder = BiCodecVocosBackbone(
            config.semantic_model_config.hidden_size, dim, inner, config.encoder_num_layers
        )
        self.stages = nn.ModuleList(
            [BiCodecVocosBackbone(dim, dim, inner, 2) for _ in range(config.encoder_num_stages)]
        )
        self.project = nn.Linear(dim, config.hidden_size)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden_states = self.encoder(features, mask)
        for stage in self.stages:
            hidden_states = stage(STAGE_GAIN * hidden_states.transpose(1, 2), mask)
        return self.project(hidden_states).transpose(1, 2)


class BiCodecSemanticQuantizer(nn.Module):
    """Factorized VQ: project to `codebook_dim`, nearest codeword by cosine similarity, project back."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.in_project = nn.Conv1d(config.hidden_size, config.codebook_dim, kernel_size=1)
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)
        self.out_project = nn.Conv1d(config.codebook_dim, config.hidden_size, kernel_size=1)

    def similarities(self, latents: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every frame to every codeword, `(batch, frames, codebook_size)`."""
        projected = F.normalize(self.in_project(latents).transpose(1, 2), dim=-1)
        return projected @ F.normalize(self.codebook.weight, dim=-1).t()

    def encode(self, latents: torch.Tensor) -> torch.LongTensor:
        return self.similarities(latents).argmax(dim=-1)

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        return self.out_project(self.codebook(codes).transpose(1, 2))


class BiCodecMelSpectrogram(nn.Module):
    """Linear-magnitude (power 1) slaney mel spectrogram, centred reflect-padded STFT with a periodic Hann window."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.n_fft, self.hop_length = config.mel_n_fft, config.mel_hop_length
        filters, window = self.compute_buffers(config)
        self.register_buffer("mel_filters", filters, persistent=False)
        self.register_buffer("window", window, persistent=False)

    @staticmethod
    def compute_buffers(config: BiCodecConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The mel filterbank `(n_fft // 2 + 1, num_mel_bins)` and the analysis window, derived from the config."""
        filters = mel_filter_bank(
            num_frequency_bins=config.mel_n_fft // 2 + 1,
            num_mel_filters=config.num_mel_bins,
            min_frequency=config.mel_fmin,
            max_frequency=config.mel_fmax if config.mel_fmax is not None else config.sampling_rate / 2,
            sampling_rate=config.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        return torch.tensor(filters, dtype=torch.float32), torch.hann_window(config.mel_win_length)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)` -> `(batch, num_mel_bins, frames)`, float32 whatever the codec's dtype (for the FFT)."""
        spectrum = torch.stft(
            waveform.float(),
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.window.shape[0],
            window=self.window.float(),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()
        return torch.matmul(self.mel_filters.float().t(), spectrum)


class BiCodecConv1dReluBn(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(hidden_states)))


class BiCodecRes2Conv1dReluBn(nn.Module):
    """Res2Net block: split channels into `scale` groups, each conv sees its group plus the previous output."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int = 8):
        super().__init__()
        self.width = channels // scale
        padding = dilation * (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(self.width, self.width, kernel_size, padding=padding, dilation=dilation)
                for _ in range(scale - 1)
            ]
        )
        self.bns = nn.ModuleList([nn.BatchNorm1d(self.width) for _ in range(scale - 1)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        groups = torch.split(hidden_states, self.width, dim=1)
        outputs, previous = [], None
        for index, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            group = groups[index] if previous is None else previous + groups[index]
            previous = bn(F.relu(conv(group)))
            outputs.append(previous)
        outputs.append(groups[-1])
        return torch.cat(outputs, dim=1)


class BiCodecSqueezeExcitation(nn.Module):
    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(hidden_states.mean(dim=2)))))
        return hidden_states * gate.unsqueeze(2)


class BiCodecSERes2Block(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv_in = BiCodecConv1dReluBn(channels, channels)
        self.res2conv = BiCodecRes2Conv1dReluBn(channels, kernel_size=3, dilation=dilation)
        self.conv_out = BiCodecConv1dReluBn(channels, channels)
        self.se = BiCodecSqueezeExcitation(channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.se(self.conv_out(self.res2conv(self.conv_in(hidden_states))))


class BiCodecEcapaTdnn(nn.Module):
    """ECAPA-TDNN trunk: the frame-level latent `(batch, ecapa_output_channels, frames)` that the perceiver reads."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        channels = config.ecapa_channels
        self.layer1 = BiCodecConv1dReluBn(config.num_mel_bins, channels, kernel_size=5, padding=2)
        self.layer2 = BiCodecSERes2Block(channels, dilation=2)
        self.layer3 = BiCodecSERes2Block(channels, dilation=3)
        self.layer4 = BiCodecSERes2Block(channels, dilation=4)
        self.conv = nn.Conv1d(3 * channels, config.ecapa_output_channels, kernel_size=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        out1 = self.layer1(mel)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        return F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))


class BiCodecPerceiverAttention(nn.Module):
    """Cross-attention from the latents to `[latents; context]`, no bias, no pre-norm."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = torch.cat([latents, context], dim=1)
        batch = latents.shape[0]
        query = self.to_q(latents).view(batch, latents.shape[1], self.heads, -1).transpose(1, 2)
        key, value = (
            t.view(batch, context.shape[1], self.heads, -1).transpose(1, 2)
            for t in self.to_kv(context).chunk(2, dim=-1)
        )
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.to_out(attended.transpose(1, 2).reshape(batch, latents.shape[1], -1))


class BiCodecGegluFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        self.fc_in = nn.Linear(dim, 2 * inner)
        self.fc_out = nn.Linear(inner, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.fc_in(hidden_states).chunk(2, dim=-1)
        return self.fc_out(F.gelu(gate) * hidden_states)


class BiCodecPerceiverLayer(nn.Module):
    def __init__(self, config: BiCodecConfig):
        super().__init__()
        dim = config.speaker_latent_dim
        self.attention = BiCodecPerceiverAttention(dim, config.perceiver_heads, config.perceiver_head_dim)
        self.feed_forward = BiCodecGegluFeedForward(dim, config.perceiver_ff_mult)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = self.attention(latents, context) + latents
        return self.feed_forward(latents) + latents


class BiCodecScaledRMSNorm(nn.Module):
    """`normalize(x) * sqrt(dim) * weight`, the perceiver's output norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.normalize(hidden_states, dim=-1) * hidden_states.shape[-1] ** 0.5 * self.weight


class BiCodecPerceiverResampler(nn.Module):
    """Resamples the variable-length ECAPA latent to `num_global_tokens` learned latents."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        dim = config.speaker_latent_dim
        self.proj_context = nn.Linear(config.ecapa_output_channels, dim)
        self.latents = nn.Parameter(torch.zeros(config.num_global_tokens, dim))
        self.layers = nn.ModuleList([BiCodecPerceiverLayer(config) for _ in range(config.perceiver_depth)])
        self.norm = BiCodecScaledRMSNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        context = self.proj_context(context)
        latents = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.norm(latents)


class BiCodecFiniteScalarQuantizer(nn.Module):
    """Single-stage residual FSQ: project to `len(levels)` dims, bound with tanh, round, pack digits into an id."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.project_in = nn.Linear(config.speaker_latent_dim, len(config.fsq_levels))
        self.project_out = nn.Linear(len(config.fsq_levels), config.speaker_latent_dim)
        levels, basis = self.compute_buffers(config)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @staticmethod
    def compute_buffers(config: BiCodecConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels per digit, and the place value of each digit in a packed id.

        Both are integer tensors, so casting the codec to another dtype leaves them exact.
        """
        levels = torch.tensor(config.fsq_levels, dtype=torch.long)
        basis = torch.cumprod(torch.tensor([1, *config.fsq_levels[:-1]], dtype=torch.long), dim=0)
        return levels, basis

    def bound(self, values: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        half_range = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_range)
        return torch.tanh(values + shift) * half_range - offset

    def encode(self, latents: torch.Tensor) -> torch.LongTensor:
        """`(batch, tokens, speaker_latent_dim)` -> `(batch, tokens)` ids."""
        digits = torch.round(self.bound(self.project_in(latents.to(self.project_in.weight.dtype)).float()))
        digits = digits + self.levels // 2
        return (digits.long() * self.basis).sum(dim=-1)

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """`(batch, tokens)` ids -> `(batch, tokens, speaker_latent_dim)`."""
        half_width = self.levels // 2
        digits = (codes.unsqueeze(-1) // self.basis) % self.levels
        return self.project_out(((digits - half_width) / half_width).to(self.project_out.weight.dtype))


class BiCodecSpeakerEncoder(nn.Module):
    """Reference mel -> global tokens, and global tokens -> the speaker d-vector that conditions the decoder."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.ecapa = BiCodecEcapaTdnn(config)
        self.perceiver = BiCodecPerceiverResampler(config)
        self.quantizer = BiCodecFiniteScalarQuantizer(config)
        self.project = nn.Linear(config.speaker_latent_dim * config.num_global_tokens, config.hidden_size)

    def latents(self, mel: torch.Tensor) -> torch.Tensor:
        """`(batch, num_mel_bins, frames)` -> perceiver output `(batch, num_global_tokens, speaker_latent_dim)`."""
        return self.perceiver(self.ecapa(mel).transpose(1, 2))

    def d_vector(self, global_codes: torch.LongTensor) -> torch.Tensor:
        quantized = self.quantizer.decode(global_codes)  # (batch, tokens, latent)
        return self.project(quantized.transpose(1, 2).reshape(global_codes.shape[0], -1))


class BiCodecPrenet(nn.Module):
    """Quantized latents + d-vector -> decoder input, a speaker-conditioned ConvNeXt stack."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        dim, inner = config.prenet_vocos_dim, config.prenet_intermediate_size
        self.linear_pre = nn.Linear(config.hidden_size, dim)
        self.stages = nn.ModuleList(
            [BiCodecVocosBackbone(dim, dim, inner, 2) for _ in range(config.prenet_num_stages)]
        )
        self.vocos_backbone = BiCodecVocosBackbone(
            dim, dim, inner, config.prenet_num_layers, condition_dim=config.hidden_size
        )
        self.linear = nn.Linear(dim, config.hidden_size)

    def forward(self, latents: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_pre(latents.transpose(1, 2))
        for stage in self.stages:
            hidden_states = stage(STAGE_GAIN * hidden_states.transpose(1, 2), mask)
        hidden_states = self.vocos_backbone(hidden_states.transpose(1, 2), mask, condition)
        return self.linear(hidden_states).transpose(1, 2)


class BiCodecTimeMajorConv1d(nn.Conv1d):
    """`nn.Conv1d` that convolves a time-major input on CPU as it is laid out (same weights, keys and init).

    oneDNN convolves channels-last data natively: `conv2d` on the channels-last view of a time-major
    `(batch, channels, time)` tensor reads it as it is and returns time-major output. `conv1d` copies such an input
    to channel-major first, a transpose with 2 KB strides, and in bf16 oneDNN convolves channel-major data
    channels-last anyway and copies its output back (192 channels x 15,880 samples, 2 threads: 18.5 ms convolving,
    8.8 ms copying). wav2vec2's feature encoder normalises each convolution's output over channels between two
    transposes, so its convolutions get time-major input (published size, 4 s clip, one thread: the second
    convolution 178 ms against 79 ms; the feature encoder 410-440 ms against 255-280 ms, same tokens);
    [`BiCodecWaveGenerator`] runs its tail time-major.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not is_time_major_on_cpu(hidden_states) or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return super().forward(hidden_states)
        hidden_states = F.conv2d(
            hidden_states.unsqueeze(2),
            self.weight.unsqueeze(2),
            self.bias,
            stride=(1, self.stride[0]),
            padding=(0, self.padding[0]),
            dilation=(1, self.dilation[0]),
            groups=self.groups,
        )
        return hidden_states.squeeze(2)


class BiCodecTimeMajorConvTranspose1d(nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` that upsamples a time-major input on CPU as it is laid out; see
    [`BiCodecTimeMajorConv1d`]."""

    def forward(self, hidden_states: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not is_time_major_on_cpu(hidden_states) or output_size is not None:
            return super().forward(hidden_states, output_size)
        hidden_states = F.conv_transpose2d(
            hidden_states.unsqueeze(2),
            self.weight.unsqueeze(2),
            self.bias,
            stride=(1, self.stride[0]),
            padding=(0, self.padding[0]),
            output_padding=(0, self.output_padding[0]),
            groups=self.groups,
            dilation=(1, self.dilation[0]),
        )
        return hidden_states.squeeze(2)


# Interpolation points of the Winograd convolutions, then infinity. Their float32 error for F(6, 7), against float64,
# 192 channels: 9e-6 of the output (with +-3 instead of +-2/3: 3e-5; +-1/4, +-4 instead of +-3/2, +-2/3: 1.1e-5).
WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.5, -1.5, 2 / 3, -2 / 3)


def winograd_matrices(outputs: int, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Toom-Cook matrices of Winograd's minimal correlation F(outputs, kernel_size), in float64.

    `outputs` values of a `kernel_size`-tap correlation over `size = outputs + kernel_size - 1` inputs `x` take
    `size` products instead of `outputs * kernel_size`:
    `output_transform @ ((kernel_transform @ w) * (input_transform @ x))`. Returns (output_transform
    `(outputs, size)`, kernel_transform `(size, kernel_size)`, input_transform `(size, size)`).
    """
    size = outputs + kernel_size - 1
    if size - 1 > len(WINOGRAD_POINTS):
        raise ValueError(f"F({outputs}, {kernel_size}) needs {size - 1} points; {len(WINOGRAD_POINTS)} are defined")
    points = torch.tensor(WINOGRAD_POINTS[: size - 1], dtype=torch.float64)

    def vandermonde(columns: int) -> torch.Tensor:
        """Polynomials of `columns` coefficients at the points; the last row, infinity's, takes the leading one."""
        infinity = torch.zeros(1, columns, dtype=torch.float64)
        infinity[0, -1] = 1.0
        return torch.cat([points[:, None] ** torch.arange(columns, dtype=torch.float64), infinity])

    return vandermonde(outputs).T, vandermonde(kernel_size), torch.linalg.inv(vandermonde(size)).T


class WinogradWorkspace(threading.local):
    """Per-thread scratch tensors that [`BiCodecDilatedConv1d`] reuses from call to call.

    Its intermediates are 1-2x the activation's size (up to 30 MB at published size); fresh allocations of that size
    are new pages every call, and took a 192-channel convolution from 29 ms to 50 ms.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised `shape` tensor of `like`'s dtype, in the named buffer (grown when too small)."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            buffer = self.buffers[name] = torch.empty(numel, dtype=like.dtype)
        return buffer[:numel].view(shape)


WINOGRAD_WORKSPACE = WinogradWorkspace()


class BiCodecDilatedConv1d(BiCodecTimeMajorConv1d):
    """A residual unit's dilated "same" convolution; on CPU at inference with wide channels, Winograd's F(6, 7).

    Each run of 6 outputs of a 7-tap kernel takes 12 products per channel pair instead of 42, as 12 matrix products
    over channels (one per transform point) between input and output transforms. The wave generator's 7-tap
    convolutions are half of a CPU decode, and oneDNN runs them near the cores' peak, so fewer products is what is
    left. Published size, 2 threads: 65 -> 23 ms at 768 channels (1,600 samples), 47 -> 21 ms at 384 (4,880),
    50 -> 29 ms at 192 (19,520); at 96 channels (39,040 samples) no faster than oneDNN, which keeps
    `winograd_min_channels`. Output within 1e-5 of float64 (oneDNN: 1e-6), float32 only; with autograd recording,
    while compiling, or on other devices, the direct convolution runs. The transformed kernel is kept (12/7 of the
    weight's memory) until the weight changes: in place (its version), loaded, or moved or cast.
    """

    winograd_outputs = 6
    winograd_min_channels = 192

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.uses_winograd(hidden_states):
            return super().forward(hidden_states)
        return self.winograd(hidden_states)

    def uses_winograd(self, hidden_states: torch.Tensor) -> bool:
        kernel_size, dilation = self.kernel_size[0], self.dilation[0]
        return (
            hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and min(self.in_channels, self.out_channels) >= self.winograd_min_channels
            and self.groups == 1
            and self.stride[0] == 1
            and self.padding_mode == "zeros"
            and self.padding[0] == dilation * (kernel_size - 1) // 2
            and kernel_size % 2 == 1
            and self.winograd_outputs + kernel_size - 2 <= len(WINOGRAD_POINTS)
            and not (torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()
        )

    def _apply(self, fn, recurse=True):
        self._winograd_cache = None  # derived from the weights that `.to()` and the like replace
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._winograd_cache = None  # inference tensors, loaded into in place, keep no version to compare
        return super()._load_from_state_dict(*args, **kwargs)

    def winograd_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output transform, input transform, transformed kernel `(size, in, out)`), float32, cached per weight."""
        weight = self.weight
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        cached = getattr(self, "_winograd_cache", None)
        if cached is None or cached[0] != key:
            output_transform, kernel_transform, input_transform = winograd_matrices(
                self.winograd_outputs, self.kernel_size[0]
            )
            kernel = torch.einsum("sk,oik->sio", kernel_transform, weight.detach().double())
            operands = (output_transform.float(), input_transform.float(), kernel.float().contiguous())
            self._winograd_cache = cached = (key, operands)
        return cached[1]

    def winograd(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch, in, time)` of any layout -> `(batch, out, time)` laid out time-major."""
        output_transform, input_transform, kernel = self.winograd_operands()
        batch, channels, length = hidden_states.shape
        size, outputs, dilation, pad = (
            input_transform.shape[0],
            self.winograd_outputs,
            self.dilation[0],
            self.padding[0],
        )
        # Outputs come in runs of `outputs` per dilation phase: run r of phase p is positions
        # (r * outputs + i) * dilation + p, from padded inputs (r * outputs + j) * dilation + p, j < size.
        runs = -(-length // (outputs * dilation))
        rows = batch * runs * dilation
        workspace = WINOGRAD_WORKSPACE
        padded = workspace.get(
            "padded, then result", (batch, runs * outputs * dilation + 2 * pad, channels), hidden_states
        )
        padded[:, :pad].zero_()
        padded[:, pad + length :].zero_()
        padded[:, pad : pad + length].copy_(hidden_states.transpose(1, 2))
        windows = padded.as_strided(
            (size, batch, runs, dilation, channels),
            (dilation * channels, padded.stride(0), outputs * dilation * channels, channels, 1),
        )
        gathered = workspace.get("gathered, then products", (size, rows * channels), hidden_states)
        gathered.view(windows.shape).copy_(windows)
        transformed = workspace.get("transformed", (size, rows * channels), hidden_states)
        torch.mm(input_transform, gathered, out=transformed)
        products = workspace.get("gathered, then products", (size, rows, self.out_channels), hidden_states)
        torch.bmm(transformed.view(size, rows, channels), kernel, out=products)
        result = workspace.get("padded, then result", (outputs, rows * self.out_channels), hidden_states)
        torch.mm(output_transform, products.view(size, -1), out=result)
        output = hidden_states.new_empty(batch, runs, outputs, dilation, self.out_channels)
        result = result.view(outputs, batch, runs, dilation, self.out_channels).permute(1, 2, 0, 3, 4)
        if self.bias is None:
            output.copy_(result)
        else:
            torch.add(result, self.bias, out=output)
        output = output.view(batch, -1, self.out_channels)[:, :length]
        return (output if batch == 1 else output.contiguous()).transpose(1, 2)


def is_time_major_on_cpu(hidden_states: torch.Tensor) -> bool:
    """A CPU `(batch, channels, time)` tensor whose channels are adjacent in memory (stride 1)."""
    return hidden_states.device.type == "cpu" and hidden_states.shape[1] > 1 and hidden_states.stride(1) == 1


def time_major(hidden_states: torch.Tensor) -> torch.Tensor:
    """`(batch, channels, time)` with the same values, laid out time-major."""
    return hidden_states.transpose(1, 2).contiguous().transpose(1, 2)


class BiCodecSnake1d(Snake1d):
    """DAC's Snake activation, `x + sin(alpha * x)^2 / alpha`, computed within one new tensor at inference.

    The wave generator's activations are its largest tensors (96 channels x 16,000 samples per second of audio),
    and `Snake1d` makes four new ones of that size per call: on CPU its passes over memory took about a quarter of a
    decode. In place, the values are bit-identical and the call about 2x faster. With autograd recording, the
    parent's out-of-place form runs.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (hidden_states.requires_grad or self.alpha.requires_grad):
            return super().forward(hidden_states)
        activation = torch.sin(self.alpha * hidden_states)
        return activation.mul_(activation).mul_((self.alpha + 1e-9).reciprocal()).add_(hidden_states)


class BiCodecResidualUnit(DacResidualUnit):
    """DAC's residual unit with [`BiCodecSnake1d`] and time-major-capable convolutions; the residual is added in
    place (same values, one tensor fewer).

    Its convolutions keep the length ("same" padding), so the residual needs no crop; adding into the last
    convolution's fresh output is safe under autograd too.
    """

    def __init__(self, dimension: int, dilation: int):
        nn.Module.__init__(self)  # DAC's layers, built once, in its order (the same random initialisation)
        self.snake1 = BiCodecSnake1d(dimension)
        self.conv1 = BiCodecDilatedConv1d(dimension, dimension, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = BiCodecSnake1d(dimension)
        self.conv2 = BiCodecTimeMajorConv1d(dimension, dimension, kernel_size=1)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.snake2(self.conv1(self.snake1(hidden_state)))).add_(hidden_state)


def apply_mask(hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded frames (`mask` None: a batch without padding, nothing to zero)."""
    return hidden_states if mask is None else hidden_states * mask


class BiCodecDecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by `stride`, three dilated DAC residual units."""

    def __init__(self, input_dim: int, output_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.stride = stride
        self.snake = BiCodecSnake1d(input_dim)
        self.conv_t = BiCodecTimeMajorConvTranspose1d(
            input_dim, output_dim, kernel_size, stride=stride, padding=(kernel_size - stride) // 2
        )
        self.res_units = nn.ModuleList([BiCodecResidualUnit(output_dim, dilation) for dilation in (1, 3, 9)])

    def forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states = self.conv_t(apply_mask(self.snake(hidden_states), mask))
        mask = None if mask is None else mask.repeat_interleave(self.stride, dim=-1)
        for unit in self.res_units:
            hidden_states = unit(apply_mask(hidden_states, mask))
        return hidden_states, mask


class BiCodecWaveGenerator(nn.Module):
    """DAC decoder: `(batch, hidden_size, frames)` -> `(batch, frames * hop_length)` in [-1, 1].

    On CPU without autograd, each clip is decoded alone, to its own length (padded frames are not computed, and stay
    zero), and everything after its first block (the "tail", whose activations are the decoder's largest: 96-384
    channels at 40-320 samples per token) runs `tile_frames` tokens at a time, with enough context either side
    (`tail_reach`) that every tile's samples are those of the whole clip (to float rounding, 2e-6). Activations then
    stay in the cores' caches. At published size with 2 threads: 8 clips of 4 s took 14.0 s in one batched call,
    10.9 s as eight calls and 10.1-10.3 s in tiles; one 20 s clip 8.9 s (peak RSS 2.36 GB) whole and 6.4 s (1.99 GB)
    in tiles. The tiles run time-major ([`BiCodecTimeMajorConv1d`]): 4 clips of 4 s, alternated in one process, 5.35 s
    against 6.46 s channel-major in float32 (same audio to 2.5e-6) and 2.45 s against 3.45 s in bf16 (the same
    samples); the first block stays channel-major, where time-major was 12% slower in float32 and no faster in bf16.
    The residual units' wide 7-tap convolutions run as Winograd's F(6, 7) there ([`BiCodecDilatedConv1d`]).
    """

    tile_frames = 96

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        channels = config.decoder_channels
        self.conv_in = nn.Conv1d(config.hidden_size, channels, kernel_size=7, padding=3)
        self.blocks = nn.ModuleList(
            [
                BiCodecDecoderBlock(channels // 2**i, channels // 2 ** (i + 1), kernel, stride)
                for i, (stride, kernel) in enumerate(zip(config.upsampling_rates, config.decoder_kernel_sizes))
            ]
        )
        output_dim = channels // 2 ** len(config.upsampling_rates)
        self.snake_out = BiCodecSnake1d(output_dim)
        self.conv_out = BiCodecTimeMajorConv1d(output_dim, 1, kernel_size=7, padding=3)

    def forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None, harmonics: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` `(batch, 1, frames)`, None for a batch without padding (every multiplication by it is skipped).

        `harmonics` `(batch, frames * hop)`: the harmonic synthesiser's signal, added before the output's tanh.
        """
        if hidden_states.device.type == "cpu" and not torch.is_grad_enabled():
            return self.decode_clips_in_tiles(hidden_states, mask, harmonics)
        hidden_states = self.conv_in(apply_mask(hidden_states, mask))
        hidden_states, mask = self.blocks[0](hidden_states, mask)
        return self.tail(hidden_states, mask, harmonics)

    def tail(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None, harmonics: torch.Tensor | None
    ) -> torch.Tensor:
        """The blocks after the first and the output layer: first block's output -> audio `(batch, samples)`."""
        for block in self.blocks[1:]:
            hidden_states, mask = block(hidden_states, mask)
        hidden_states = self.conv_out(self.snake_out(apply_mask(hidden_states, mask)))
        if harmonics is not None:
            hidden_states = hidden_states + harmonics.unsqueeze(1).to(hidden_states.dtype)
        return apply_mask(torch.tanh(hidden_states), mask).squeeze(1)

    def tail_reach(self) -> int:
        """Samples of the tail's input either side of a position that its output there depends on, rounded up.

        A transposed convolution of kernel k, stride s and padding p reaches max(k - 1 - p, p) / s input samples; a
        convolution of kernel k and dilation d reaches d * (k - 1) / 2 samples at its own rate.
        """
        reach, rate = 0.0, 1
        for block in self.blocks[1:]:
            kernel, padding = block.conv_t.kernel_size[0], block.conv_t.padding[0]
            reach += max(kernel - 1 - padding, padding) / block.stride / rate
            rate *= block.stride
            for unit in block.res_units:
                reach += unit.conv1.dilation[0] * (unit.conv1.kernel_size[0] - 1) / 2 / rate
        reach += (self.conv_out.kernel_size[0] - 1) / 2 / rate
        return math.ceil(reach)

    def decode_clips_in_tiles(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None, harmonics: torch.Tensor | None
    ) -> torch.Tensor:
        """`forward`'s audio, one clip at a time up to its length, the tail in tiles (see the class docstring)."""
        batch_size, _, frames = hidden_states.shape
        lengths = [frames] * batch_size if mask is None else mask_to_lengths(mask).tolist()
        first_stride = self.blocks[0].stride
        upsampling = math.prod(block.stride for block in self.blocks[1:])
        hop = first_stride * upsampling
        step, halo = self.tile_frames * first_stride, self.tail_reach()
        audio = hidden_states.new_zeros(batch_size, frames * hop)
        for item, length in enumerate(lengths):
            if length == 0:  # an empty clip: its audio stays empty (zeros in a padded batch)
                continue
            clip, _ = self.blocks[0](self.conv_in(hidden_states[item : item + 1, :, :length]), None)
            for start in range(0, clip.shape[-1], step):
                end = min(start + step, clip.shape[-1])
                low, high = max(0, start - halo), min(clip.shape[-1], end + halo)
                tile_harmonics = None
                if harmonics is not None:
                    tile_harmonics = harmonics[item : item + 1, low * upsampling : high * upsampling]
                tile = self.tail(time_major(clip[..., low:high]), None, tile_harmonics)
                audio[item, start * upsampling : end * upsampling] = tile[
                    0, (start - low) * upsampling : (end - low) * upsampling
                ]
        return audio


class BiCodecPitchPredictor(nn.Module):
    """Decoder input -> log fundamental frequency and a voicing logit per semantic token."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=5, padding=2)
        self.proj = nn.Conv1d(config.hidden_size, 2, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (log Hz, voicing logits), each `(batch, frames)`."""
        output = self.proj(F.gelu(self.conv(hidden_states * mask)))
        return math.log(PITCH_REFERENCE_HZ) + output[:, 0], output[:, 1]


def without_tf32(function: Callable) -> Callable:
    """Run `function` with TF32 off for CUDA float32 convolutions and matrix products.

    The harmonic synthesiser integrates the predicted pitch into phase over a whole clip, so the pitch's rounding
    error grows with the clip: with TF32 (10-bit mantissa) convolutions, two decodes of one clip that cuDNN runs with
    different algorithms (padded to another length, or in a CUDA graph) drift apart in phase. What feeds the pitch
    runs at token rate, a small share of a decode, so it runs in full float32.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return function(*args, **kwargs)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    return wrapper


def harmonic_frame_phases(
    frequencies: torch.Tensor, hop_length: int, sampling_rate: int, initial_phase: torch.Tensor | None = None
) -> torch.Tensor:
    """Phase (radians, in [0, 2 pi)) of the fundamental at each token's first sample and after the last token.

    `frequencies` `(batch, frames)` is constant within a token. Each token's advance is reduced modulo 2 pi before
    the sum, so float32 keeps a long clip's phase to about 1e-3 rad. A stream continues a clip's phase where an
    earlier window left it by passing that phase `(batch,)` as `initial_phase`. Returns `(batch, frames + 1)`.
    """
    steps = torch.remainder(2 * math.pi * frequencies * hop_length / sampling_rate, 2 * math.pi)
    phases = torch.cat([torch.zeros_like(steps[:, :1]), torch.cumsum(steps, dim=-1)], dim=-1)
    if initial_phase is not None:
        phases = phases + initial_phase.to(phases.dtype).unsqueeze(-1)
    return torch.remainder(phases, 2 * math.pi)


class BiCodecHarmonicSynthesizer(nn.Module):
    """Harmonic amplitudes per token from the decoder input, played as sines at the predicted pitch."""

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.hop_length, self.sampling_rate = config.hop_length, config.sampling_rate
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=3, padding=1)
        self.proj = nn.Conv1d(config.hidden_size, config.harmonic_count, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor,
        frequencies: torch.Tensor,
        voiced: torch.Tensor,
        initial_phase: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(batch, frames * hop)`: the sum of the harmonics below Nyquist, silent where a token is unvoiced.

        Amplitudes are interpolated linearly between token centres; the frequency is constant within a token.
        """
        output = self.proj(F.gelu(self.conv(hidden_states * mask)))
        amplitudes = HARMONIC_GAIN * F.softplus(output.float() + HARMONIC_OFFSET)
        frequencies = frequencies.float()
        frames, hop = frequencies.shape[-1], self.hop_length
        # Padding frames repeat an item's last amplitudes, so that its end interpolates as it does alone.
        last = mask_to_lengths(mask).clamp(min=1) - 1
        index = torch.minimum(torch.arange(frames, device=last.device).unsqueeze(0), last.unsqueeze(-1))
        amplitudes = amplitudes.gather(-1, index.unsqueeze(1).expand_as(amplitudes))
        amplitudes = F.interpolate(amplitudes, size=frames * hop, mode="linear", align_corners=False)
        starts = harmonic_frame_phases(frequencies, hop, self.sampling_rate, initial_phase)[:, :-1]
        offsets = torch.arange(hop, device=frequencies.device, dtype=frequencies.dtype) / self.sampling_rate
        phase = (starts.unsqueeze(-1) + 2 * math.pi * frequencies.unsqueeze(-1) * offsets).flatten(1)
        numbers = torch.arange(1, amplitudes.shape[1] + 1, device=phase.device, dtype=phase.dtype).unsqueeze(-1)
        per_sample = frequencies.repeat_interleave(hop, dim=-1).unsqueeze(1)
        audible = voiced.repeat_interleave(hop, dim=-1).unsqueeze(1) & (per_sample * numbers < self.sampling_rate / 2)
        return (amplitudes * audible * torch.sin(numbers * phase.unsqueeze(1))).sum(1)


class BiCodecMagnitudeRefiner(nn.Module):
    """Gives decoded audio a spectral magnitude predicted from the decoder input, keeping the audio's own phase.

    A head (an upsampling to frame rate and a ConvNeXt stack) predicts each frame's log-magnitude spectrum; the
    wave generator's audio is analysed into frames (periodic Hann window, centred), each frame takes the predicted
    magnitude with its own phase, and the frames are overlap-added back. The analysis and the overlap-add are
    convolutions with a fixed DFT basis: frames past an item's end are left out of the sum and of the window
    normalisation, so a padded batch gives each item exactly its audio alone, and no FFT runs in a CUDA graph.
    One pass, no iterations: the phase of the wave generator's harmonics is kept.
    """

    def __init__(self, config: BiCodecConfig):
        super().__init__()
        self.n_fft, self.hop_length = config.magnitude_n_fft, config.magnitude_hop_length
        self.frames_per_token = config.hop_length // self.hop_length
        dim = config.magnitude_dim
        self.upsample = nn.ConvTranspose1d(
            config.hidden_size, dim, self.frames_per_token, stride=self.frames_per_token
        )
        self.backbone = BiCodecVocosBackbone(dim, dim, 3 * dim, config.magnitude_num_layers)
        self.proj = nn.Linear(dim, self.n_fft // 2 + 1)
        analysis, synthesis, window_power = self.compute_buffers(config)
        self.register_buffer("analysis", analysis, persistent=False)
        self.register_buffer("synthesis", synthesis, persistent=False)
        self.register_buffer("window_power", window_power, persistent=False)

    @staticmethod
    def compute_buffers(config: BiCodecConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kernels `(2 * bins, 1, n_fft)` of the windowed DFT (real parts, then imaginary) and of its inverse
        times the window, and the squared window `(1, 1, n_fft)` that normalises the overlap-add."""
        n_fft = config.magnitude_n_fft
        window = torch.hann_window(n_fft, dtype=torch.float64)
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64).unsqueeze(-1)
        angles = 2 * math.pi * bins * torch.arange(n_fft, dtype=torch.float64) / n_fft
        analysis = torch.cat([torch.cos(angles), -torch.sin(angles)]) * window
        # a real signal's inverse DFT counts every bin but DC and Nyquist twice (their conjugates)
        weights = torch.full_like(bins, 2.0 / n_fft)
        weights[0] = weights[-1] = 1.0 / n_fft
        synthesis = torch.cat([weights * torch.cos(angles), -weights * torch.sin(angles)]) * window
        return analysis.float().unsqueeze(1), synthesis.float().unsqueeze(1), (window**2).float().view(1, 1, -1)

    def log_magnitudes(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder input `(batch, hidden_size, tokens)` -> predicted log magnitudes `(batch, bins, frames + 1)`: a
        frame every `hop_length` samples (`frames_per_token` a token) and one centred on the end; an item's frames
        past its end repeat its last, so that it ends as it does alone."""
        frame_mask = mask.repeat_interleave(self.frames_per_token, dim=-1)
        hidden_states = self.upsample(hidden_states * mask)
        predicted = self.proj(self.backbone(hidden_states, frame_mask)).transpose(1, 2).float()
        frames = predicted.shape[-1]
        last = (mask_to_lengths(mask) * self.frames_per_token).clamp(min=1) - 1
        index = torch.minimum(torch.arange(frames + 1, device=last.device).unsqueeze(0), last.unsqueeze(-1))
        return predicted.gather(-1, index.unsqueeze(1).expand(-1, predicted.shape[1], -1))

    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)` -> the windowed DFT `(batch, 2 * bins, samples // hop_length + 1)`, zero-padded."""
        padded = F.pad(audio.float().unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        return F.conv1d(padded, self.analysis.float(), stride=self.hop_length)

    @staticmethod
    def magnitudes(frames: torch.Tensor) -> torch.Tensor:
        """`frames` `(batch, 2 * bins, frames)` -> their magnitudes `(batch, bins, frames)`."""
        real, imaginary = frames.chunk(2, dim=1)
        return torch.sqrt(real**2 + imaginary**2)

    def overlap_add(self, frames: torch.Tensor, frame_mask: torch.Tensor, samples: int) -> torch.Tensor:
        """Inverse of `frames` over the frames in `frame_mask` `(batch, 1, frames)`: `(batch, samples)`."""
        crop = slice(self.n_fft // 2, self.n_fft // 2 + samples)
        summed = F.conv_transpose1d(frames * frame_mask, self.synthesis.float(), stride=self.hop_length)[..., crop]
        norm = F.conv_transpose1d(frame_mask, self.window_power.float(), stride=self.hop_length)[..., crop]
        return (summed / norm.clamp(min=1e-6)).squeeze(1)

    def forward(self, audio: torch.Tensor, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The wave generator's `audio` `(batch, tokens * hop)` with the magnitude predicted from its input."""
        return self.with_magnitudes(audio, self.log_magnitudes(hidden_states, mask), mask)

    def with_magnitudes(self, audio: torch.Tensor, log_magnitudes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`audio` whose frames take the magnitudes `exp(log_magnitudes)` `(batch, bins, frames)` and keep their
        phase; each item's frames up to its end (`mask` `(batch, 1, tokens)`), and zeros past it."""
        spectrum = self.frames(audio)
        scale = log_magnitudes.exp() / self.magnitudes(spectrum).clamp(min=1e-8)
        last_frame = mask_to_lengths(mask) * self.frames_per_token  # the frame centred on the item's end
        frame_mask = torch.arange(spectrum.shape[-1], device=mask.device) <= last_frame.unsqueeze(-1)
        refined = self.overlap_add(spectrum * scale.repeat(1, 2, 1), frame_mask.unsqueeze(1).float(), audio.shape[-1])
        return refined * mask.repeat_interleave(audio.shape[-1] // mask.shape[-1], dim=-1).squeeze(1)


def build_semantic_model(config: BiCodecConfig) -> tuple[nn.Module, str | None]:
    """The semantic model, cut after the deepest layer BiCodec reads, and a pattern for the weights it leaves out.

    BiCodec averages wav2vec2 hidden states `semantic_hidden_layers` (11, 14, 16 of the published 24 layers). Hidden
    state `i` is the output of layer `i`, and wav2vec2's stable-layer-norm encoder normalises only its last hidden
    state: cut after layer 16, with that final norm an identity, hidden state 16 is what the whole model gives. So
    8 of the 24 published layers and the final norm are not built (about a third of wav2vec2's time and 400 MB),
    and their checkpoint weights are skipped on load. Other encoders keep one layer past the deepest index read, so
    the hidden state read is never their last. Its plain convolutions (not grouped, zero padding) become
    [`BiCodecTimeMajorConv1d`]. Returns (model, a regex that finds the skipped keys, or None).
    """
    semantic_config = config.semantic_model_config
    layers = semantic_config.num_hidden_layers
    stable_norm = getattr(semantic_config, "do_stable_layer_norm", False)
    needed = max(config.semantic_hidden_layers) + (0 if stable_norm else 1)
    if needed < layers:
        semantic_config = copy.deepcopy(semantic_config)
        semantic_config.num_hidden_layers = needed
    model = AutoModel.from_config(semantic_config)
    for module in model.modules():
        if type(module) is nn.Conv1d and module.groups == 1 and module.padding_mode == "zeros":
            module.__class__ = BiCodecTimeMajorConv1d
    if needed >= layers:
        return model, None
    skipped = rf"semantic_model\.encoder\.layers\.({'|'.join(str(index) for index in range(needed, layers))})\."
    if stable_norm:
        model.encoder.layer_norm = nn.Identity()
        skipped += r"|semantic_model\.encoder\.layer_norm\."
    return model, skipped


class BiCodecPreTrainedModel(PreTrainedAudioTokenizerBase):
    config: BiCodecConfig
    base_model_prefix = "bicodec"
    main_input_name = "input_values"
    input_modalities = "audio"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    # The codec runs in float32 whatever dtype the surrounding model is loaded in.
    _keep_in_fp32_modules_strict = [
        "semantic_model",
        "encoder",
        "quantizer",
        "speaker_encoder",
        "prenet",
        "decoder",
        "pitch_predictor",
        "harmonic_synthesizer",
        "magnitude_refiner",
    ]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, BiCodecConditionProjection):
            # This draw is overwritten: it keeps what a seeded construction takes from the random stream as it was
            # before these projections had their own init, so that seeded training runs (gpa-tiny's recipe) repeat.
            init.trunc_normal_(module.weight, std=std)
            init.zeros_(module.weight)
            init.constant_(module.bias, module.initial_bias)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, Snake1d):
            init.ones_(module.alpha)
        elif isinstance(module, BiCodecConvNeXtBlock):
            init.constant_(module.gamma, 1.0 / 12)
        elif isinstance(module, BiCodecPerceiverResampler):
            init.normal_(module.latents, std=0.02)
        elif isinstance(module, BiCodecScaledRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, BiCodecMelSpectrogram):
            filters, window = module.compute_buffers(self.config)
            init.copy_(module.mel_filters, filters)
            init.copy_(module.window, window)
        elif isinstance(module, BiCodecMagnitudeRefiner):
            analysis, synthesis, window_power = module.compute_buffers(self.config)
            init.copy_(module.analysis, analysis)
            init.copy_(module.synthesis, synthesis)
            init.copy_(module.window_power, window_power)
        elif isinstance(module, BiCodecFiniteScalarQuantizer):
            levels, basis = module.compute_buffers(self.config)
            init.copy_(module.levels, levels)
            init.copy_(module.basis, basis)


class BiCodecModel(BiCodecPreTrainedModel):
    """BiCodec audio tokenizer: `encode` audio to (semantic, global) tokens, `decode` them back to 16 kHz audio.

    Inputs come from [`BiCodecFeatureExtractor`]: `input_values` (wav2vec2-normalised, padded), their
    `attention_mask`, and `reference_values` (the loudness-normalised speaker reference clips).
    """

    def __init__(self, config: BiCodecConfig):
        super().__init__(config)
        if config.include_semantic_encoder:
            self.semantic_model, skipped = build_semantic_model(config)
            self.encoder = BiCodecFeatureEncoder(config)
            if skipped:
                self._keys_to_ignore_on_load_unexpected = [skipped]
        else:
            self.semantic_model = None
            self.encoder = None
            # A full checkpoint loaded for decoding only: its semantic-path weights are expected and skipped.
            self._keys_to_ignore_on_load_unexpected = [r"^semantic_model\.", r"^encoder\."]
        self.quantizer = BiCodecSemanticQuantizer(config)
        self.mel = BiCodecMelSpectrogram(config)
        self.speaker_encoder = BiCodecSpeakerEncoder(config)
        self.prenet = BiCodecPrenet(config)
        self.decoder = BiCodecWaveGenerator(config)
        self.pitch_predictor = BiCodecPitchPredictor(config) if config.harmonic_count else None
        self.harmonic_synthesizer = BiCodecHarmonicSynthesizer(config) if config.harmonic_count else None
        self.magnitude_refiner = BiCodecMagnitudeRefiner(config) if config.magnitude_n_fft else None
        self.post_init()

    @property
    def codec_dtype(self) -> torch.dtype:
        return self.quantizer.codebook.weight.dtype

    def semantic_lengths(self, sample_lengths: torch.Tensor) -> torch.LongTensor:
        """Semantic tokens for clips of `sample_lengths` samples: `floor((n - 400) / 320) + 1` published."""
        if self.semantic_model is not None:
            return self.semantic_model._get_feat_extract_output_lengths(sample_lengths).long()
        receptive_field = self.config.semantic_receptive_field
        return torch.div(sample_lengths - receptive_field, self.config.hop_length, rounding_mode="floor") + 1

    def reference_mel(self, reference_values: torch.Tensor) -> torch.Tensor:
        """Speaker reference clips `(batch, reference_length)` -> mel `(batch, num_mel_bins, frames)`."""
        return self.mel(reference_values).to(self.codec_dtype)

    def encode_speaker(self, reference_values: torch.Tensor) -> BiCodecEncoderOutput:
        """Global (speaker) tokens from reference clips alone: no wav2vec2, no semantic path."""
        latents = self.speaker_encoder.latents(self.reference_mel(reference_values))
        return BiCodecEncoderOutput(
            global_codes=self.speaker_encoder.quantizer.encode(latents), speaker_latents=latents.transpose(1, 2)
        )

    def encode(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        reference_values: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BiCodecEncoderOutput | tuple:
        """Semantic tokens of `input_values` and, when `reference_values` are given, their global tokens."""
        if self.semantic_model is None:
            raise ValueError(
                "this BiCodec was built with include_semantic_encoder=False (speaker encoding and decoding only); "
                "load it with include_semantic_encoder=True to compute semantic tokens"
            )
        if input_values.ndim != 2:
            raise ValueError(f"input_values must be (batch, samples), got shape {tuple(input_values.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_values, dtype=torch.long)
        semantic_model_dtype = next(self.semantic_model.parameters()).dtype
        hidden_states = self.semantic_model(
            input_values.to(semantic_model_dtype), attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states
        features = torch.stack([hidden_states[i] for i in self.config.semantic_hidden_layers]).mean(dim=0)
        features = features.to(self.codec_dtype)
        lengths = self.semantic_lengths(attention_mask.sum(-1))
        mask = lengths_to_mask(lengths, features.shape[1]).to(features.dtype)
        latents = self.encoder(features.transpose(1, 2), mask)
        codes = self.quantizer.encode(latents) * mask[:, 0].long()
        speaker = self.encode_speaker(reference_values) if reference_values is not None else BiCodecEncoderOutput()
        output = BiCodecEncoderOutput(
            semantic_codes=codes,
            semantic_lengths=lengths,
            global_codes=speaker.global_codes,
            semantic_features=features,
            semantic_latents=latents,
            speaker_latents=speaker.speaker_latents,
        )
        return output if return_dict else output.to_tuple()

    def speaker_embedding(self, global_codes: torch.LongTensor) -> torch.Tensor:
        """The d-vector `(batch, hidden_size)` that global tokens decode to."""
        return self.speaker_encoder.d_vector(global_codes)

    def check_code_shapes(self, semantic_codes: torch.LongTensor, global_codes: torch.LongTensor) -> None:
        """Raise for token tensors `decode` cannot take; reads shapes only (no device sync)."""
        if semantic_codes.ndim != 2 or global_codes.ndim != 2:
            raise ValueError(
                "decode expects semantic_codes (batch, frames) and global_codes (batch, num_global_tokens), got "
                f"{tuple(semantic_codes.shape)} and {tuple(global_codes.shape)}"
            )
        if global_codes.shape[-1] != self.config.num_global_tokens:
            raise ValueError(
                f"expected {self.config.num_global_tokens} global tokens; got {global_codes.shape[-1]} per item"
            )

    @staticmethod
    def lengths_or_full(
        semantic_codes: torch.LongTensor, semantic_lengths: torch.LongTensor | None
    ) -> torch.LongTensor:
        """`semantic_lengths`, or every item as long as the padded `(batch, frames)` codes when not given."""
        if semantic_lengths is not None:
            return semantic_lengths
        return torch.full((semantic_codes.shape[0],), semantic_codes.shape[1], device=semantic_codes.device)

    def decode(
        self,
        semantic_codes: torch.LongTensor,
        global_codes: torch.LongTensor,
        semantic_lengths: torch.LongTensor | None = None,
        return_dict: bool = True,
        initial_phase: torch.Tensor | None = None,
    ) -> BiCodecDecoderOutput | tuple:
        """Semantic `(batch, frames)` + global `(batch, num_global_tokens)` tokens -> `(batch, frames * hop)` audio.

        `initial_phase` `(batch,)`: the harmonic synthesiser's phase at the first token (see
        `harmonic_frame_phases`), for a window that continues a clip; 0 when not given.
        """
        self.check_code_shapes(semantic_codes, global_codes)
        for name, codes, size in (
            ("semantic", semantic_codes, self.config.codebook_size),
            ("global", global_codes, self.config.global_codebook_size),
        ):
            if codes.numel() and (codes.min() < 0 or codes.max() >= size):
                raise ValueError(f"{name} token ids must be in [0, {size}), got [{codes.min()}, {codes.max()}]")
        semantic_lengths = self.lengths_or_full(semantic_codes, semantic_lengths)
        audio = self.decode_without_checks(semantic_codes, global_codes, semantic_lengths, initial_phase)
        output = BiCodecDecoderOutput(audio_values=audio, audio_lengths=semantic_lengths * self.config.hop_length)
        return output if return_dict else output.to_tuple()

    @without_tf32
    def decoder_inputs(
        self, semantic_codes: torch.LongTensor, global_codes: torch.LongTensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The wave generator's input `(batch, hidden_size, frames)`: speaker-conditioned prenet output."""
        latents = self.quantizer.decode(semantic_codes)
        d_vector = self.speaker_embedding(global_codes)
        return self.prenet(latents, d_vector, mask) + d_vector.unsqueeze(-1)

    @without_tf32
    def pitch_of_decoder_inputs(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> BiCodecPitchOutput:
        """`pitch` from the wave generator's input (`decoder_inputs`), for callers that have it already."""
        log_frequencies, voicing_logits = self.pitch_predictor(hidden_states, mask)
        return BiCodecPitchOutput(frequencies=log_frequencies.exp(), voiced=(voicing_logits > 0) & mask[:, 0].bool())

    def pitch(
        self,
        semantic_codes: torch.LongTensor,
        global_codes: torch.LongTensor,
        semantic_lengths: torch.LongTensor | None = None,
    ) -> BiCodecPitchOutput:
        """The pitch the harmonic synthesiser plays for these tokens (a codec with `harmonic_count > 0`)."""
        if self.pitch_predictor is None:
            raise ValueError("this BiCodec has no harmonic synthesiser (harmonic_count=0), so it predicts no pitch")
        self.check_code_shapes(semantic_codes, global_codes)
        semantic_lengths = self.lengths_or_full(semantic_codes, semantic_lengths)
        mask = lengths_to_mask(semantic_lengths, semantic_codes.shape[1]).to(self.codec_dtype)
        return self.pitch_of_decoder_inputs(self.decoder_inputs(semantic_codes, global_codes, mask), mask)

    def decode_without_checks(
        self,
        semantic_codes: torch.LongTensor,
        global_codes: torch.LongTensor,
        semantic_lengths: torch.LongTensor,
        initial_phase: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`decode`'s audio `(batch, frames * hop)`, without its checks of the token ids (the shapes are checked).

        The id checks read the ids on the host; this takes ids known to be valid (a GPA model's own output) and never
        waits for the device, so it can be captured in a CUDA graph.
        """
        self.check_code_shapes(semantic_codes, global_codes)
        mask = lengths_to_mask(semantic_lengths, semantic_codes.shape[1]).to(self.codec_dtype)
        hidden_states = self.decoder_inputs(semantic_codes, global_codes, mask)
        harmonics = None
        if self.harmonic_synthesizer is not None:
            pitch = self.pitch_of_decoder_inputs(hidden_states, mask)
            harmonics = self.harmonic_synthesizer(hidden_states, mask, pitch.frequencies, pitch.voiced, initial_phase)
        # Without padding, the wave generator's masking is a multiplication by ones at every layer: skipped. Checking
        # reads the mask on the host, which a CUDA graph being captured cannot, so only CPU batches are checked.
        unpadded = mask.device.type == "cpu" and bool(mask.all())
        audio = self.decoder(hidden_states, None if unpadded else mask, harmonics)
        if self.magnitude_refiner is not None:
            audio = self.refine_magnitudes(audio, hidden_states, mask)
        return audio

    @without_tf32
    def refine_magnitudes(self, audio: torch.Tensor, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`audio` with the magnitude refiner's spectrum, in float32 (TF32 would round the DFT's sums)."""
        return self.magnitude_refiner(audio, hidden_states, mask).to(audio.dtype)

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        reference_values: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BiCodecDecoderOutput | tuple:
        """Encode then decode (a round trip through the tokens)."""
        encoded = self.encode(input_values, attention_mask, reference_values)
        return self.decode(encoded.semantic_codes, encoded.global_codes, encoded.semantic_lengths, return_dict)


__all__ = [
    "BiCodecDecoderOutput",
    "BiCodecEncoderOutput",
    "BiCodecModel",
    "BiCodecPitchOutput",
    "BiCodecPreTrainedModel",
    "harmonic_frame_phases",
]
