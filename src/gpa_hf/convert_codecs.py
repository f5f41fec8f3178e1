"""Load the published `BiCodec/` and `glm-4-voice-tokenizer/` folders into gpa-hf classes, with strict key checks.

Every stored key is either mapped onto a parameter of the new model (shape checked) or on an explicit list of
weights GPA inference never uses; anything else, and any parameter left without a stored value, is an error
naming the keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import Wav2Vec2Config, Wav2Vec2Model

from .configuration_bicodec import BiCodecConfig
from .configuration_glm_speech_tokenizer import GlmSpeechTokenizerConfig
from .feature_extraction_bicodec import BiCodecFeatureExtractor
from .feature_extraction_glm_speech_tokenizer import GlmSpeechTokenizerFeatureExtractor
from .modeling_bicodec import BiCodecModel
from .modeling_glm_speech_tokenizer import GlmSpeechTokenizerModel

BICODEC_DIR = "BiCodec"
GLM_TOKENIZER_DIR = "glm-4-voice-tokenizer"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53"

# Stored BiCodec weights that GPA inference never reads.
BICODEC_UNUSED = (
    re.compile(r"^postnet\."),  # training-only reconstruction head
    re.compile(r"^speaker_encoder\.speaker_encoder\.(pool|bn|linear)\."),  # x-vector head; the tokens use the latent
    re.compile(r"^quantizer\.cluster_size$"),  # EMA codebook statistics of training
    re.compile(r"^mel_transformer\."),  # deterministic mel filters, rebuilt from the config
)
# Stored GLM tokenizer weights that the first `quantize_position` layers never read.
GLM_UNUSED = (
    re.compile(r"^embed_positions2\."),  # position table of the layers after the quantizer
    re.compile(r"^layer_norm\."),
)

_BICODEC_RENAMES = (
    (re.compile(r"^(encoder|prenet)\.downsample\.(\d+)\.1\."), r"\1.stages.\2."),
    (re.compile(r"^speaker_encoder\.speaker_encoder\."), "speaker_encoder.ecapa."),
    (re.compile(r"\.se_res2block\.0\."), ".conv_in."),
    (re.compile(r"\.se_res2block\.1\."), ".res2conv."),
    (re.compile(r"\.se_res2block\.2\."), ".conv_out."),
    (re.compile(r"\.se_res2block\.3\."), ".se."),
    (re.compile(r"^speaker_encoder\.perceiver_sampler\."), "speaker_encoder.perceiver."),
    (re.compile(r"^(speaker_encoder\.perceiver\.layers\.\d+)\.0\."), r"\1.attention."),
    (re.compile(r"^(speaker_encoder\.perceiver\.layers\.\d+)\.1\.0\."), r"\1.feed_forward.fc_in."),
    (re.compile(r"^(speaker_encoder\.perceiver\.layers\.\d+)\.1\.2\."), r"\1.feed_forward.fc_out."),
    (re.compile(r"^speaker_encoder\.perceiver\.norm\.gamma$"), "speaker_encoder.perceiver.norm.weight"),
)
_RESIDUAL_UNIT_PARTS = {"0": "snake1", "1": "conv1", "2": "snake2", "3": "conv2"}


class CheckpointMismatchError(ValueError):
    """A stored checkpoint does not fit the model built from its config."""


def _rename_decoder_key(key: str, num_blocks: int) -> str:
    """`decoder.model.N...` (DAC layout) -> `decoder.{conv_in,blocks.i,snake_out,conv_out}...`."""
    match = re.match(r"^decoder\.model\.(\d+)\.(.*)$", key)
    if not match:
        return key
    index, rest = int(match.group(1)), match.group(2)
    if index == 0:
        return f"decoder.conv_in.{rest}"
    if index == num_blocks + 1:
        return f"decoder.snake_out.{rest}"
    if index == num_blocks + 2:
        return f"decoder.conv_out.{rest}"
    block = f"decoder.blocks.{index - 1}"
    unit = re.match(r"^block\.(\d+)\.block\.(\d+)\.(.*)$", rest)
    if unit:
        return f"{block}.res_units.{int(unit.group(1)) - 2}.{_RESIDUAL_UNIT_PARTS[unit.group(2)]}.{unit.group(3)}"
    part = re.match(r"^block\.(\d+)\.(.*)$", rest)
    if part is None:
        return key
    return f"{block}.{ {'0': 'snake', '1': 'conv_t'}.get(part.group(1), part.group(1)) }.{part.group(2)}"


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace `X.weight_g` / `X.weight_v` pairs (weight norm over dim 0) by `X.weight = g * v / ||v||`."""
    folded = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            prefix = key[: -len(".weight_v")]
            gain = state_dict[f"{prefix}.weight_g"].float()
            direction = value.float()
            norm = direction.flatten(1).norm(dim=1).view(-1, *([1] * (direction.ndim - 1)))
            folded[f"{prefix}.weight"] = gain * direction / norm
        else:
            folded[key] = value
    return folded


def convert_bicodec_state_dict(
    original: Mapping[str, torch.Tensor], num_decoder_blocks: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original BiCodec keys -> gpa-hf keys (weight norm folded). Returns the new dict and the unused keys."""
    unused = sorted(k for k in original if any(p.search(k) for p in BICODEC_UNUSED))
    kept = {k: v for k, v in original.items() if k not in set(unused)}
    converted = {}
    for key, value in fold_weight_norm(kept).items():
        new_key = _rename_decoder_key(key, num_decoder_blocks)
        for pattern, replacement in _BICODEC_RENAMES:
            new_key = pattern.sub(replacement, new_key)
        converted[new_key] = value
    return converted, unused


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], source: str, skip_prefix=()
):
    """Raise naming every missing, unexpected or mis-shaped key between `state_dict` and the `expected` one."""
    expected = {k: v for k, v in expected.items() if not k.startswith(tuple(skip_prefix))}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: stored {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"not used by the model: {unexpected}")
    if mismatched:
        problems.append(f"shape mismatch: {mismatched}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit the model: " + "; ".join(problems))


def bicodec_config_from_yaml(
    audio_tokenizer: Mapping, flat: Mapping, ecapa_channels: int, semantic_model_config: Wav2Vec2Config | None
) -> BiCodecConfig:
    """The published `config.yaml` (`audio_tokenizer:` block + flat front-end keys) -> BiCodecConfig."""
    mel, enc, quant = audio_tokenizer["mel_params"], audio_tokenizer["encoder"], audio_tokenizer["quantizer"]
    spk, pre, dec = audio_tokenizer["speaker_encoder"], audio_tokenizer["prenet"], audio_tokenizer["decoder"]
    widths = {
        enc["out_channels"],
        quant["input_dim"],
        pre["input_channels"],
        pre["out_channels"],
        dec["input_channel"],
    }
    widths |= {spk["out_dim"], pre["condition_dim"]}
    if len(widths) != 1:
        raise ValueError(f"BiCodec config.yaml: expected one latent width across encoder/prenet/decoder, got {widths}")
    if any(r != 1 for r in [*enc.get("sample_ratios", [1, 1]), *pre.get("sample_ratios", [1, 1])]):
        raise ValueError("BiCodec config.yaml: only sample_ratios of 1 (the published model) are supported")
    if pre.get("use_tanh_at_final"):
        raise ValueError("BiCodec config.yaml: use_tanh_at_final=true is not supported (the published model: false)")
    if spk.get("fsq_num_quantizers", 1) != 1:
        raise ValueError("BiCodec config.yaml: only fsq_num_quantizers=1 (the published model) is supported")
    kwargs = {
        "sampling_rate": flat.get("sample_rate", mel["sample_rate"]),
        "hop_length": flat.get("latent_hop_length", 320),
        "reference_duration": float(flat.get("ref_segment_duration", 6)),
        "volume_normalize": bool(flat.get("volume_normalize", True)),
        "hidden_size": enc["out_channels"],
        "encoder_vocos_dim": enc["vocos_dim"],
        "encoder_intermediate_size": enc["vocos_intermediate_dim"],
        "encoder_num_layers": enc["vocos_num_layers"],
        "encoder_num_stages": len(enc.get("sample_ratios", [1, 1])),
        "codebook_size": quant["codebook_size"],
        "codebook_dim": quant["codebook_dim"],
        "mel_n_fft": mel["n_fft"],
        "mel_win_length": mel["win_length"],
        "mel_hop_length": mel["hop_length"],
        "mel_fmin": float(mel["mel_fmin"]),
        "mel_fmax": mel["mel_fmax"],
        "num_mel_bins": mel["num_mels"],
        "ecapa_channels": ecapa_channels,
        "speaker_latent_dim": spk["latent_dim"],
        "num_global_tokens": spk["token_num"],
        "fsq_levels": list(spk["fsq_levels"]),
        "prenet_vocos_dim": pre["vocos_dim"],
        "prenet_intermediate_size": pre["vocos_intermediate_dim"],
        "prenet_num_layers": pre["vocos_num_layers"],
        "prenet_num_stages": len(pre.get("sample_ratios", [1, 1])),
        "decoder_channels": dec["channels"],
        "upsampling_rates": list(dec["rates"]),
        "decoder_kernel_sizes": list(dec["kernel_sizes"]),
        "include_semantic_encoder": semantic_model_config is not None,
    }
    if semantic_model_config is not None:
        kwargs["semantic_model_config"] = semantic_model_config.to_dict()
        if semantic_model_config.hidden_size != enc["input_channels"]:
            raise ValueError(
                f"BiCodec encoder expects {enc['input_channels']}-dim features, wav2vec2 gives "
                f"{semantic_model_config.hidden_size}"
            )
    return BiCodecConfig(**kwargs)


def _load_wav2vec2(folder: Path) -> Wav2Vec2Model:
    model, info = Wav2Vec2Model.from_pretrained(folder, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise CheckpointMismatchError(
            f"{folder} does not fit Wav2Vec2Model: missing {sorted(info['missing_keys'])}, "
            f"mismatched {info['mismatched_keys']}"
        )
    pretraining_heads = ("quantizer.", "project_q.", "project_hid.")
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(pretraining_heads)]
    if unexpected:
        raise CheckpointMismatchError(f"{folder} has weights Wav2Vec2Model does not use: {sorted(unexpected)}")
    return model


def load_original_bicodec(
    folder: str | Path, include_semantic_encoder: bool = True
) -> tuple[BiCodecModel, BiCodecFeatureExtractor]:
    """Build a [`BiCodecModel`] and its feature extractor from a published `BiCodec/` folder."""
    folder = Path(folder)
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{folder}: not a BiCodec folder (expected {config_path})")
    raw = yaml.safe_load(config_path.read_text())
    if "audio_tokenizer" not in raw:
        raise ValueError(f"{config_path}: expected an 'audio_tokenizer:' block")
    original = {
        k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / "model.safetensors").items()
    }
    ecapa_key = "speaker_encoder.speaker_encoder.layer1.conv.weight"
    if ecapa_key not in original:
        raise CheckpointMismatchError(f"{folder / 'model.safetensors'}: missing {ecapa_key}")
    wav2vec2 = _load_wav2vec2(folder / WAV2VEC2_DIR) if include_semantic_encoder else None
    config = bicodec_config_from_yaml(
        raw["audio_tokenizer"], raw, original[ecapa_key].shape[0], wav2vec2.config if wav2vec2 else None
    )
    model = BiCodecModel(config)
    state_dict, _ = convert_bicodec_state_dict(original, len(config.upsampling_rates))
    if not include_semantic_encoder:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    check_state_dict(
        model.state_dict(), state_dict, str(folder / "model.safetensors"), skip_prefix=("semantic_model.",)
    )
    model.load_state_dict(state_dict, strict=False)
    if wav2vec2 is not None:  # the weights of the layers BiCodec reads (see `build_semantic_model`), strictly
        kept = model.semantic_model.state_dict()
        weights = {key: value for key, value in wav2vec2.state_dict().items() if key in kept}
        model.semantic_model.load_state_dict(weights)
    model.eval()
    feature_extractor = BiCodecFeatureExtractor(
        sampling_rate=config.sampling_rate,
        hop_length=config.hop_length,
        reference_length=config.reference_length,
        volume_normalize=config.volume_normalize,
        volume_coefficient=config.volume_coefficient,
    )
    return model, feature_extractor


def glm_config_from_whisper(original: Mapping) -> GlmSpeechTokenizerConfig:
    """The published WhisperVQEncoder `config.json` -> GlmSpeechTokenizerConfig."""
    required = {
        "encoder_causal_convolution": True,
        "quantize_encoder_only": True,
        "pooling_type": "avg",
        "encoder_causal_attention": False,
    }
    for key, value in required.items():
        if original.get(key) != value:
            raise ValueError(f"GLM tokenizer config: expected {key}={value!r}, got {original.get(key)!r}")
    if original["pooling_position"] != original["quantize_position"]:
        raise ValueError(
            "GLM tokenizer config: pooling_position must equal quantize_position (pool right before quantizing), "
            f"got {original['pooling_position']} and {original['quantize_position']}"
        )
    return GlmSpeechTokenizerConfig(
        num_mel_bins=original["num_mel_bins"],
        d_model=original["d_model"],
        encoder_attention_heads=original["encoder_attention_heads"],
        encoder_ffn_dim=original["encoder_ffn_dim"],
        num_hidden_layers=original["quantize_position"],
        max_source_positions=original["max_source_positions"],
        attention_block_size=original["quantize_causal_block_size"],
        pooling_kernel_size=original["pooling_kernel_size"],
        codebook_size=original["quantize_vocab_size"],
        activation_function=original.get("activation_function", "gelu"),
    )


def convert_glm_state_dict(
    original: Mapping[str, torch.Tensor], num_layers: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the weights of layers past the quantizer; everything else keeps its name."""

    def unused(key: str) -> bool:
        layer = re.match(r"^layers\.(\d+)\.", key)
        return any(p.search(key) for p in GLM_UNUSED) or (layer is not None and int(layer.group(1)) >= num_layers)

    dropped = sorted(k for k in original if unused(k))
    return {k: v for k, v in original.items() if not unused(k)}, dropped


def load_original_glm_tokenizer(
    folder: str | Path,
) -> tuple[GlmSpeechTokenizerModel, GlmSpeechTokenizerFeatureExtractor]:
    """Build a [`GlmSpeechTokenizerModel`] and its feature extractor from a published `glm-4-voice-tokenizer/`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a GLM-4-Voice tokenizer folder (expected config.json)")
    config = glm_config_from_whisper(json.loads((folder / "config.json").read_text()))
    original = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    state_dict, _ = convert_glm_state_dict(original, config.num_hidden_layers)
    model = GlmSpeechTokenizerModel(config)
    check_state_dict(model.state_dict(), state_dict, str(folder / "model.safetensors"))
    model.load_state_dict(state_dict)
    model.eval()
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    feature_extractor = GlmSpeechTokenizerFeatureExtractor(
        feature_size=preprocessor.get("feature_size", config.num_mel_bins),
        sampling_rate=preprocessor.get("sampling_rate", 16000),
        hop_length=preprocessor.get("hop_length", 160),
        chunk_length=preprocessor.get("chunk_length", 30),
        n_fft=preprocessor.get("n_fft", 400),
    )
    return model, feature_extractor


__all__ = [
    "CheckpointMismatchError",
    "check_state_dict",
    "convert_bicodec_state_dict",
    "convert_glm_state_dict",
    "fold_weight_norm",
    "load_original_bicodec",
    "load_original_glm_tokenizer",
]
