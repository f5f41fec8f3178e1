"""Strict loading of published checkpoints, save/load round trips, precision and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURES, ORIGINAL_CHECKPOINT
from safetensors.torch import load_file, save_file

from gpa_hf import BiCodecModel, GlmSpeechTokenizerModel, load_audio
from gpa_hf.convert_codecs import (
    CheckpointMismatchError,
    bicodec_config_from_yaml,
    check_state_dict,
    convert_bicodec_state_dict,
    convert_glm_state_dict,
    glm_config_from_whisper,
    load_original_bicodec,
)


def meta_state_dict(entries: dict[str, list]) -> dict[str, torch.Tensor]:
    """Manifest entries are `[shape, dtype]`."""
    return {k: torch.empty(shape, device="meta") for k, (shape, _) in entries.items()}


def test_published_size_bicodec_accepts_every_manifest_key():
    manifest = json.loads((FIXTURES / "full_size_manifest.json").read_text())
    shapes = manifest["bicodec_state_dict"]
    ecapa = shapes["speaker_encoder.speaker_encoder.layer1.conv.weight"][0][0]
    config = bicodec_config_from_yaml(manifest["bicodec_config_audio_tokenizer_block"], {}, ecapa, None)
    config.include_semantic_encoder = True
    assert ecapa == config.ecapa_channels == 512
    with torch.device("meta"):
        model = BiCodecModel(config)
    converted, unused = convert_bicodec_state_dict(meta_state_dict(shapes), len(config.upsampling_rates))
    check_state_dict(model.state_dict(), converted, "manifest", skip_prefix=("semantic_model.",))
    known_unused = ("postnet.", "speaker_encoder.speaker_encoder.", "quantizer.cluster_size", "mel_transformer.")
    assert all(k.startswith(known_unused) for k in unused)


def test_published_size_glm_tokenizer_accepts_every_manifest_key():
    manifest = json.loads((FIXTURES / "full_size_manifest.json").read_text())
    config = glm_config_from_whisper(manifest["glm_speech_tokenizer_config"])
    assert (config.num_hidden_layers, config.d_model, config.codebook_size) == (16, 1280, 16384)
    with torch.device("meta"):
        model = GlmSpeechTokenizerModel(config)
    converted, unused = convert_glm_state_dict(
        meta_state_dict(manifest["glm_speech_tokenizer_state_dict"]), config.num_hidden_layers
    )
    check_state_dict(model.state_dict(), converted, "manifest")
    assert unused == ["embed_positions2.weight"]


def test_loader_names_missing_and_unexpected_keys(tmp_path):
    folder = tmp_path / "BiCodec"
    folder.mkdir()
    for name in ("config.yaml",):
        (folder / name).write_bytes((ORIGINAL_CHECKPOINT / "BiCodec" / name).read_bytes())
    state = load_file(ORIGINAL_CHECKPOINT / "BiCodec" / "model.safetensors")
    state.pop("decoder.model.0.weight_g")
    state.pop("decoder.model.0.weight_v")
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        load_original_bicodec(folder, include_semantic_encoder=False)
    assert "decoder.conv_in.weight" in str(error.value)
    assert "decoder.extra.weight" in str(error.value)


def test_loader_names_shape_mismatch(tmp_path):
    folder = tmp_path / "BiCodec"
    folder.mkdir()
    (folder / "config.yaml").write_bytes((ORIGINAL_CHECKPOINT / "BiCodec" / "config.yaml").read_bytes())
    state = load_file(ORIGINAL_CHECKPOINT / "BiCodec" / "model.safetensors")
    state["quantizer.codebook.weight"] = torch.zeros(10, 8)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"quantizer.codebook.weight: stored \(10, 8\)"):
        load_original_bicodec(folder, include_semantic_encoder=False)


def test_save_pretrained_round_trip_is_exact(bicodec, glm_tokenizer, tmp_path):
    model, _ = bicodec
    model.save_pretrained(tmp_path / "bicodec")
    reloaded = BiCodecModel.from_pretrained(tmp_path / "bicodec")
    assert set(reloaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    glm, _ = glm_tokenizer
    glm.save_pretrained(tmp_path / "glm")
    reloaded_glm = GlmSpeechTokenizerModel.from_pretrained(tmp_path / "glm")
    assert all(torch.equal(v, reloaded_glm.state_dict()[k]) for k, v in glm.state_dict().items())


def test_decode_only_loading_skips_wav2vec2_and_decodes_identically(bicodec, expected, tmp_path):
    model, _ = bicodec
    model.save_pretrained(tmp_path)
    decoder_only = BiCodecModel.from_pretrained(tmp_path, include_semantic_encoder=False)
    assert decoder_only.semantic_model is None and decoder_only.encoder is None
    with torch.no_grad():
        audio = decoder_only.decode(expected["000.semantic_tokens"][None], expected["000.global_tokens"]).audio_values
    torch.testing.assert_close(audio[0], expected["000.decoded_wav"], atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="include_semantic_encoder"):
        decoder_only.encode(torch.zeros(1, 16000))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codecs_stay_float32_in_half_precision_loads(bicodec, glm_tokenizer, tmp_path, dtype):
    bicodec[0].save_pretrained(tmp_path / "b")
    glm_tokenizer[0].save_pretrained(tmp_path / "g")
    assert {p.dtype for p in BiCodecModel.from_pretrained(tmp_path / "b", dtype=dtype).parameters()} == {torch.float32}
    assert {p.dtype for p in GlmSpeechTokenizerModel.from_pretrained(tmp_path / "g", dtype=dtype).parameters()} == {
        torch.float32
    }


# ---- the shared audio loader and bad input ------------------------------------------------------------------


def test_loader_handles_formats_rates_and_channels(tmp_path, expected):
    clip = expected["astro.glm_input_16k"].numpy()
    stereo_44k = np.stack([clip, clip], axis=1)
    sf.write(tmp_path / "a.flac", stereo_44k, 16000)
    sf.write(tmp_path / "a.ogg", stereo_44k, 16000, format="OGG", subtype="OPUS")
    np.testing.assert_allclose(load_audio(tmp_path / "a.flac"), clip, atol=1e-4)
    assert abs(load_audio(tmp_path / "a.ogg").shape[0] - clip.shape[0]) <= 320
    from_tensor = load_audio(torch.from_numpy(stereo_44k.T.copy()), sampling_rate=16000)
    np.testing.assert_allclose(from_tensor, clip, atol=1e-6)
    from_dict = load_audio({"array": clip, "sampling_rate": 8000}, target_sampling_rate=16000)
    assert from_dict.dtype == np.float32 and abs(from_dict.shape[0] - 2 * clip.shape[0]) <= 1
    segment = load_audio(tmp_path / "a.flac", start_time=1.0, end_time=2.0)
    np.testing.assert_allclose(segment, clip[16000:32000], atol=1e-4)


@pytest.mark.parametrize(
    ("audio", "kwargs", "message"),
    [
        (np.zeros(0, dtype=np.float32), {"sampling_rate": 16000}, "empty"),
        (np.array([0.1, np.nan] * 500, dtype=np.float32), {"sampling_rate": 16000}, "NaN or infinite"),
        (np.array([0.1, np.inf] * 500, dtype=np.float32), {"sampling_rate": 16000}, "NaN or infinite"),
        (np.zeros((2, 2, 100), dtype=np.float32), {"sampling_rate": 16000}, "1-D .* or 2-D"),
        (np.zeros(1000, dtype=np.float32), {}, "sampling rate"),
        (np.zeros(1000, dtype=np.int16), {"sampling_rate": 16000}, "floating-point"),
        ("/nonexistent/clip.wav", {}, "no such file"),
    ],
)
def test_bad_audio_input_is_rejected_with_a_clear_error(audio, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_audio(audio, **kwargs)


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    with pytest.raises(ValueError, match=r"notes\.wav.*cannot be read"):
        load_audio(bad)


def test_codec_front_end_rejects_short_and_silent_audio(bicodec):
    _, feature_extractor = bicodec
    with pytest.raises(ValueError, match="399 samples long; at least 400"):
        feature_extractor(np.full(399, 0.1, dtype=np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match="silent"):
        feature_extractor.speaker_inputs(np.zeros(16000, dtype=np.float32), sampling_rate=16000)
    feature_extractor(np.random.default_rng(0).uniform(-0.5, 0.5, 400).astype(np.float32), sampling_rate=16000)


def test_decode_rejects_bad_token_ids(bicodec):
    model, _ = bicodec
    with pytest.raises(ValueError, match=r"semantic token ids must be in \[0, 64\)"):
        model.decode(torch.tensor([[0, 64]]), torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 32 global tokens"):
        model.decode(torch.tensor([[0, 1]]), torch.zeros(1, 31, dtype=torch.long))
