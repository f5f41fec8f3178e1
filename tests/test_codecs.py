"""Parity of BiCodec and the GLM-4-Voice tokenizer with the reference's golden outputs, single and batched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import CLIPS

ATOL, RTOL = 1e-4, 1e-3


def assert_close(actual, expected, name):
    actual = torch.as_tensor(actual).float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected.float(), atol=ATOL, rtol=RTOL, msg=name)


def assert_semantic_tokens(actual, expected, clip):
    """Exact, except frames whose reference margin between the two best codewords is below 1e-5."""
    tokens, margin = expected[f"{clip}.semantic_tokens"], expected[f"{clip}.semantic_margin"]
    assert actual.shape == tokens.shape
    decisive = margin >= 1e-5
    assert torch.equal(actual[decisive], tokens[decisive]), f"{clip}: semantic tokens differ"


@pytest.mark.parametrize("clip", CLIPS)
def test_bicodec_single_clip_matches_reference(bicodec, clip_paths, expected, clip):
    model, feature_extractor = bicodec
    path = clip_paths[clip]
    assert_close(feature_extractor.prepare_waveform(path), expected[f"{clip}.bicodec_input_wav"], "front end")
    inputs = feature_extractor(path)
    assert_close(inputs["input_values"][0], expected[f"{clip}.wav2vec2_input_values"], "wav2vec2 input")
    assert_close(inputs["reference_values"][0], expected[f"{clip}.ref_clip"], "reference clip")
    with torch.no_grad():
        out = model.encode(**inputs)
        assert_close(out.semantic_features[0], expected[f"{clip}.wav2vec2_feature_mix"], "wav2vec2 mix")
        assert_close(out.semantic_latents[0], expected[f"{clip}.encoder_latent"], "encoder latent")
        assert_semantic_tokens(out.semantic_codes[0], expected, clip)
        assert_close(model.reference_mel(inputs["reference_values"])[0], expected[f"{clip}.ref_mel"], "mel")
        assert_close(out.speaker_latents[0], expected[f"{clip}.speaker_latent_pre_fsq"], "speaker latent")
        assert torch.equal(out.global_codes, expected[f"{clip}.global_tokens"])
        d_vector = model.speaker_embedding(expected[f"{clip}.global_tokens"])
        assert_close(d_vector[0], expected[f"{clip}.d_vector"], "d-vector")
        decoded = model.decode(expected[f"{clip}.semantic_tokens"][None], expected[f"{clip}.global_tokens"])
    assert decoded.audio_values.shape[-1] == 320 * expected[f"{clip}.semantic_tokens"].shape[0]
    assert_close(decoded.audio_values[0], expected[f"{clip}.decoded_wav"], "decoded waveform")


def test_speaker_only_encoding_matches_and_skips_wav2vec2(bicodec, clip_paths, expected):
    model, feature_extractor = bicodec
    calls = []
    handle = model.semantic_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            out = model.encode_speaker(**feature_extractor.speaker_inputs(list(clip_paths.values())))
    finally:
        handle.remove()
    assert not calls, "the speaker path must not run wav2vec2"
    for index, clip in enumerate(CLIPS):
        assert torch.equal(out.global_codes[index], expected[f"{clip}.global_tokens"][0])


def test_bicodec_batch_equals_single(bicodec, clip_paths, expected):
    model, feature_extractor = bicodec
    with torch.no_grad():
        out = model.encode(**feature_extractor([clip_paths[c] for c in CLIPS]))
    for index, clip in enumerate(CLIPS):
        length = int(out.semantic_lengths[index])
        assert length == expected[f"{clip}.semantic_tokens"].shape[0]
        assert_semantic_tokens(out.semantic_codes[index, :length], expected, clip)
        assert torch.all(out.semantic_codes[index, length:] == 0)
        assert_close(out.semantic_latents[index, :, :length], expected[f"{clip}.encoder_latent"], "latent")
        assert torch.equal(out.global_codes[index], expected[f"{clip}.global_tokens"][0])


def test_bicodec_batched_decode_equals_reference(bicodec, expected):
    model, _ = bicodec
    tokens = [expected[f"{c}.semantic_tokens"] for c in CLIPS]
    padded = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    lengths = torch.tensor([t.shape[0] for t in tokens])
    globals_ = torch.cat([expected[f"{c}.global_tokens"] for c in CLIPS])
    with torch.no_grad():
        out = model.decode(padded, globals_, lengths)
    assert torch.equal(out.audio_lengths, lengths * 320)
    for index, clip in enumerate(CLIPS):
        length = int(out.audio_lengths[index])
        assert_close(out.audio_values[index, :length], expected[f"{clip}.decoded_wav"], clip)
        assert torch.all(out.audio_values[index, length:] == 0)


@pytest.mark.parametrize("clip", CLIPS)
def test_glm_tokenizer_matches_reference(glm_tokenizer, clip_paths, expected, clip):
    model, feature_extractor = glm_tokenizer
    with torch.no_grad():
        out = model.encode(**feature_extractor(clip_paths[clip]))
    assert torch.equal(out.audio_codes[0], expected[f"{clip}.glm_tokens"])


def test_glm_tokenizer_batch_equals_single(glm_tokenizer, clip_paths, expected):
    model, feature_extractor = glm_tokenizer
    with torch.no_grad():
        out = model.encode(**feature_extractor([clip_paths[c] for c in CLIPS]))
    for index, clip in enumerate(CLIPS):
        assert torch.equal(out.audio_codes[index, : out.code_lengths[index]], expected[f"{clip}.glm_tokens"])


def test_glm_tokenizer_chunks_audio_longer_than_30_seconds(glm_tokenizer, expected):
    """A 65 s clip is tokenized in 30 s pieces: every token is kept and each piece equals its own tokenization."""
    model, feature_extractor = glm_tokenizer
    clip = expected["astro.glm_input_16k"].numpy()
    long_audio = np.tile(clip, int(np.ceil(65 * 16000 / clip.shape[0])))[: 65 * 16000]
    with torch.no_grad():
        out = model.encode(**feature_extractor(long_audio, sampling_rate=16000))
        pieces = [
            model.encode(**feature_extractor(long_audio[start : start + 480000], sampling_rate=16000)).audio_codes[0]
            for start in range(0, long_audio.shape[0], 480000)
        ]
    assert int(out.code_lengths[0]) == int(np.ceil(65 * 16000 / 1280)) == 813
    assert torch.equal(out.audio_codes[0], torch.cat(pieces))


def test_glm_input_is_resampled_from_any_rate(glm_tokenizer, expected):
    """A 44.1 kHz stereo copy of a clip gets (nearly) the tokens of the 16 kHz original, not garbage."""
    import soxr

    model, feature_extractor = glm_tokenizer
    clip = expected["astro.glm_input_16k"].numpy().astype(np.float64)
    stereo = np.stack([soxr.resample(clip, 16000, 44100, quality="VHQ")] * 2)
    with torch.no_grad():
        resampled = model.encode(**feature_extractor(stereo, sampling_rate=44100)).audio_codes[0]
    reference = expected["astro.glm_tokens"]
    assert resampled.shape == reference.shape
    assert (resampled == reference).float().mean() > 0.9


def test_wav2vec2_layers_past_the_deepest_hidden_state_are_skipped(bicodec, tmp_path):
    """A 6-layer semantic model read at hidden states 1-3 builds 4 layers, gives the full model's tokens, and
    loads a checkpoint that holds all 6 layers."""
    import copy

    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Model

    from gpa_hf import BiCodecModel

    config = copy.deepcopy(bicodec[0].config)
    config.semantic_model_config.num_hidden_layers = 6
    config.semantic_hidden_layers = [1, 2, 3]
    torch.manual_seed(0)
    model = BiCodecModel(config).eval()
    assert len(model.semantic_model.encoder.layers) == 4

    full = copy.deepcopy(model)
    full.semantic_model = Wav2Vec2Model(config.semantic_model_config).eval()
    full.semantic_model.load_state_dict(model.semantic_model.state_dict(), strict=False)  # layers 4-5 stay random
    audio = torch.randn(2, 16000)
    with torch.no_grad():
        assert torch.equal(model.encode(audio).semantic_codes, full.encode(audio).semantic_codes)

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.update({k: v for k, v in full.state_dict().items() if ".layers.4." in k or ".layers.5." in k})
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = BiCodecModel.from_pretrained(tmp_path)
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())


def test_audio_tokenizers_run_in_bfloat16(bicodec, glm_tokenizer, clip_paths, expected):
    """Cast to bfloat16 (`cast_audio_tokenizers`), both tokenizers still work and stay close to float32."""
    model, feature_extractor = bicodec
    glm, glm_features = glm_tokenizer
    model, glm = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(glm).to(torch.bfloat16)
    paths = [clip_paths[c] for c in CLIPS]
    with torch.no_grad():
        encoded = model.encode(**feature_extractor(paths))
        glm_codes = glm.encode(**glm_features(paths)).audio_codes
        tokens = [expected[f"{c}.semantic_tokens"] for c in CLIPS]
        lengths = torch.tensor([t.shape[0] for t in tokens])
        globals_ = torch.cat([expected[f"{c}.global_tokens"] for c in CLIPS])
        decoded = model.decode(torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True), globals_, lengths)
    assert decoded.audio_values.dtype == torch.bfloat16
    for index, clip in enumerate(CLIPS):
        length = int(encoded.semantic_lengths[index])
        semantic_agreement = (encoded.semantic_codes[index, :length] == expected[f"{clip}.semantic_tokens"]).float()
        global_agreement = (encoded.global_codes[index] == expected[f"{clip}.global_tokens"][0]).float()
        glm_expected = expected[f"{clip}.glm_tokens"]
        glm_agreement = (glm_codes[index, : glm_expected.shape[0]] == glm_expected).float()
        # 94-98% of the tokens are those of float32 (measured)
        assert semantic_agreement.mean() >= 0.9 and global_agreement.mean() >= 0.9, clip
        assert glm_agreement.mean() >= 0.9, clip
        reference = expected[f"{clip}.decoded_wav"].reshape(-1)
        audio = decoded.audio_values[index, : reference.numel()].float()
        snr = 10 * torch.log10(reference.pow(2).sum() / (audio - reference).pow(2).sum())
        assert snr >= 25, (clip, float(snr))  # 36 dB measured
