"""Parity of BiCodec and the GLM-4-Voice tokenizer with the reference's golden outputs, single and batched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLIPS

from gpa_hf.modeling_gpa import cast_audio_tokenizer

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


def test_wave_generator_inference_forms_equal_dac_modules_and_train(bicodec, expected):
    """Without autograd the wave generator computes Snake and residuals in place (bit-identical to DAC's
    out-of-place modules), skips all-ones masks and runs its tail time-major: the audio is the autograd path's (DAC's
    modules, channel-major) to float rounding, and gradients still flow."""
    from transformers.models.dac.modeling_dac import Snake1d

    from gpa_hf.modeling_bicodec import time_major

    model, _ = bicodec
    snake = model.decoder.blocks[1].res_units[0].snake1
    dac_snake = Snake1d(snake.alpha.shape[1])
    dac_snake.load_state_dict(snake.state_dict())
    activations = torch.randn(2, snake.alpha.shape[1], 50)
    with torch.no_grad():
        assert torch.equal(snake(activations), dac_snake(activations))
        assert torch.equal(snake(time_major(activations)), dac_snake(activations))
    codes = expected[f"{CLIPS[0]}.semantic_tokens"][None]
    global_codes = expected[f"{CLIPS[0]}.global_tokens"]
    mask = torch.ones(1, 1, codes.shape[1])
    with torch.no_grad():
        inputs = model.decoder_inputs(codes, global_codes, mask)
        in_place = model.decoder(inputs, None)
        assert torch.equal(in_place, model.decoder(inputs, mask))
    try:
        out_of_place = model.decoder(inputs, mask)
        assert out_of_place.requires_grad
        torch.testing.assert_close(in_place, out_of_place.detach(), atol=1e-5, rtol=0)
        out_of_place.square().sum().backward()
        snakes = [module for module in model.decoder.modules() if hasattr(module, "alpha")]
        assert snakes and all(snake.alpha.grad is not None and snake.alpha.grad.abs().sum() > 0 for snake in snakes)
    finally:
        model.zero_grad(set_to_none=True)


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


def test_feature_extractors_round_trip_through_save_pretrained(bicodec, glm_tokenizer, clip_paths, tmp_path):
    for name, (_, feature_extractor) in {"bicodec": bicodec, "glm": glm_tokenizer}.items():
        feature_extractor.save_pretrained(tmp_path / name)
        loaded = type(feature_extractor).from_pretrained(tmp_path / name)
        assert loaded.to_dict() == feature_extractor.to_dict()
        expected, got = feature_extractor(clip_paths["000"]), loaded(clip_paths["000"])
        assert all(torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])) for key in expected)
    with pytest.raises(ValueError, match="feature_size must be 1, got 2"):
        type(bicodec[1])(feature_size=2)


def test_wav2vec2_layers_past_the_deepest_hidden_state_are_skipped(bicodec, tmp_path):
    """A 6-layer stable-layer-norm semantic model read at hidden states 1-3 builds 3 layers and no final norm, gives
    the full model's features and tokens, and loads a checkpoint that holds all 6 layers and the norm."""
    import copy

    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Model

    from gpa_hf import BiCodecModel

    config = copy.deepcopy(bicodec[0].config)
    config.semantic_model_config.num_hidden_layers = 6
    config.semantic_hidden_layers = [1, 2, 3]
    assert config.semantic_model_config.do_stable_layer_norm
    torch.manual_seed(0)
    model = BiCodecModel(config).eval()
    assert len(model.semantic_model.encoder.layers) == 3
    assert isinstance(model.semantic_model.encoder.layer_norm, torch.nn.Identity)

    full = copy.deepcopy(model)
    full.semantic_model = Wav2Vec2Model(config.semantic_model_config).eval()
    missing, _ = full.semantic_model.load_state_dict(model.semantic_model.state_dict(), strict=False)
    assert any(key.startswith("encoder.layer_norm.") for key in missing)  # layers 3-5 and the norm stay random
    with torch.no_grad():
        full.semantic_model.encoder.layer_norm.weight.uniform_(0.5, 1.5)
    audio = torch.randn(2, 16000)
    with torch.no_grad():
        cut, whole = model.encode(audio), full.encode(audio)
    torch.testing.assert_close(cut.semantic_features, whole.semantic_features)
    assert torch.equal(cut.semantic_codes, whole.semantic_codes)

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    skipped = (".layers.3.", ".layers.4.", ".layers.5.", "encoder.layer_norm.")
    weights.update(
        {
            k: v
            for k, v in full.state_dict().items()
            if k.startswith("semantic_model.") and any(s in k for s in skipped)
        }
    )
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = BiCodecModel.from_pretrained(tmp_path)
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())


def test_audio_tokenizers_run_in_bfloat16(bicodec, glm_tokenizer, clip_paths, expected):
    """Cast to bfloat16 (`cast_audio_tokenizers`), both tokenizers still work and stay close to float32."""
    model, feature_extractor = bicodec
    glm, glm_features = glm_tokenizer
    model = cast_audio_tokenizer(copy.deepcopy(model), torch.bfloat16)
    glm = cast_audio_tokenizer(copy.deepcopy(glm), torch.bfloat16)
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


def test_bfloat16_cast_keeps_narrow_convolutions_float32_on_cpu():
    """oneDNN's bfloat16 convolution is wrong for few channels per group and long kernels on some CPUs (AMX Xeons)."""
    torch.manual_seed(0)
    narrow, wide = torch.nn.Conv1d(32, 32, 16, padding=8, groups=4), torch.nn.Conv1d(32, 32, 16, padding=8)
    module = torch.nn.Sequential(narrow, wide)
    inputs = torch.randn(1, 32, 200)
    expected = module(inputs)
    cast_audio_tokenizer(module, torch.bfloat16)
    assert narrow.weight.dtype == torch.float32 and wide.weight.dtype == torch.bfloat16
    output = module(inputs.bfloat16())
    assert output.dtype == torch.bfloat16
    assert (output.float() - expected).norm() / expected.norm() < 0.02
    cast_audio_tokenizer(module, torch.float32)  # back to float32: no guard left
    assert not narrow._forward_hooks and not narrow._forward_pre_hooks
    assert wide.weight.dtype == torch.float32 and module(inputs).dtype == torch.float32


# ---- the optional harmonic synthesiser ----------------------------------------------------------------------
def codec_with_new_modules(bicodec, new_modules: tuple[str, ...], **config_changes):
    """The fixture codec with `config_changes`, which add `new_modules` (at their initial weights, seed 0)."""
    from gpa_hf import BiCodecModel

    config = copy.deepcopy(bicodec[0].config)
    for name, value in config_changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    codec = BiCodecModel(config).eval()
    missing, unexpected = codec.load_state_dict(bicodec[0].state_dict(), strict=False)
    assert not unexpected and missing
    assert all(key.startswith(tuple(f"{name}." for name in new_modules)) for key in missing)
    return codec


def codec_with_harmonics(bicodec, harmonic_count: int = 4):
    """The fixture codec plus a harmonic synthesiser."""
    return codec_with_new_modules(bicodec, ("pitch_predictor", "harmonic_synthesizer"), harmonic_count=harmonic_count)


def play(codec, hertz: float, voiced: bool, amplitudes: list[float]):
    """Set the heads to a constant pitch and constant harmonic amplitudes."""
    from gpa_hf.modeling_bicodec import HARMONIC_GAIN, HARMONIC_OFFSET, PITCH_REFERENCE_HZ

    with torch.no_grad():
        pitch, harmonics = codec.pitch_predictor.proj, codec.harmonic_synthesizer.proj
        pitch.weight.zero_()
        pitch.bias.copy_(torch.tensor([np.log(hertz / PITCH_REFERENCE_HZ), 10.0 if voiced else -10.0]))
        harmonics.weight.zero_()
        wanted = torch.tensor(amplitudes) / HARMONIC_GAIN  # softplus^-1, and 0 -> a large negative logit
        logits = torch.where(wanted > 0, wanted + torch.log(-torch.expm1(-wanted.clamp(min=1e-6))), -50.0)
        harmonics.bias.copy_(logits - HARMONIC_OFFSET)


def synthesised(codec, expected, frames: slice | None = None, initial_phase=None):
    tokens = expected["000.semantic_tokens"][None]
    voice = expected["000.global_tokens"]
    mask = torch.ones(1, 1, tokens.shape[1])
    with torch.no_grad():
        hidden = codec.decoder_inputs(tokens, voice, mask)
        pitch = codec.pitch_of_decoder_inputs(hidden, mask)
        if frames is not None:
            hidden, mask = hidden[..., frames], mask[..., frames]
            pitch = type(pitch)(frequencies=pitch.frequencies[:, frames], voiced=pitch.voiced[:, frames])
        return codec.harmonic_synthesizer(hidden, mask, pitch.frequencies, pitch.voiced, initial_phase)[0]


def test_harmonic_synthesizer_plays_the_predicted_pitch(bicodec, expected):
    from gpa_hf.audio_utils import pitch_track

    codec = codec_with_harmonics(bicodec)
    play(codec, 200.0, True, [0.2, 0.1, 0.0, 0.0])
    tokens, voice = expected["000.semantic_tokens"][None], expected["000.global_tokens"]
    pitch = codec.pitch(tokens, voice)
    assert pitch.voiced.all() and torch.allclose(pitch.frequencies, torch.tensor(200.0))
    signal = synthesised(codec, expected).numpy()
    assert signal.shape == (tokens.shape[1] * 320,)
    assert np.median(pitch_track(signal)) == pytest.approx(200, rel=0.01)
    angle = np.linspace(0, 2 * np.pi, 10000)
    assert signal.max() == pytest.approx((0.2 * np.sin(angle) + 0.1 * np.sin(2 * angle)).max(), rel=0.01)
    play(codec, 200.0, False, [0.2, 0.1, 0.0, 0.0])
    assert not synthesised(codec, expected).any()  # unvoiced: silent
    play(codec, 3000.0, True, [0.0, 0.0, 0.2, 0.0])
    assert synthesised(codec, expected).abs().max() < 1e-6  # the third harmonic, 9 kHz, is above Nyquist
    play(codec, 2000.0, True, [0.0, 0.0, 0.2, 0.0])
    assert synthesised(codec, expected).abs().max() > 0.19  # 6 kHz sounds


def test_harmonic_phase_carries_across_windows(bicodec, expected):
    """A window decoded from token 20 with the phase `harmonic_frame_phases` gives there continues the signal of
    one decode of all tokens: what streaming relies on."""
    from gpa_hf.modeling_bicodec import harmonic_frame_phases

    codec = codec_with_harmonics(bicodec)
    play(codec, 173.0, True, [0.2, 0.1, 0.05, 0.02])
    whole = synthesised(codec, expected)
    frequencies = codec.pitch(expected["000.semantic_tokens"][None], expected["000.global_tokens"]).frequencies
    phase = harmonic_frame_phases(frequencies, 320, 16000)[:, 20]
    tail = synthesised(codec, expected, slice(20, None), initial_phase=phase)
    torch.testing.assert_close(tail, whole[20 * 320 :], atol=1e-4, rtol=0)
    restarted = synthesised(codec, expected, slice(20, None))  # without the phase: another waveform
    assert (restarted - whole[20 * 320 :]).abs().max() > 0.1


def test_pitch_path_runs_without_tf32_and_restores_the_settings(bicodec, expected):
    """The layers the pitch comes from run in full float32 (on CUDA, TF32 rounding drifts a clip's phase: 21 dB
    between a padded and an unpadded decode on an H100, 78 dB without it); the caller's settings come back."""
    codec = codec_with_harmonics(bicodec)
    seen = []

    def record(*args) -> None:
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    for module in (codec.prenet, codec.pitch_predictor):
        module.register_forward_pre_hook(record)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            codec.decode(expected["000.semantic_tokens"][None], expected["000.global_tokens"])
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == [(False, False), (False, False)] and after == (True, True)


@pytest.mark.parametrize("tile_frames", [1, 5])
def test_tiled_wave_generator_equals_whole_clips_and_skips_padding(bicodec, expected, tile_frames):
    """The CPU inference path decodes each clip alone, to its length, its tail in tiles with `tail_reach` context:
    a padded batch with harmonics gives the whole-batch (autograd-path) audio, and padding is never computed."""
    codec = codec_with_harmonics(bicodec)
    with torch.no_grad():
        codec.pitch_predictor.proj.bias.copy_(torch.tensor([0.2, 5.0]))
        codec.harmonic_synthesizer.proj.bias.fill_(3.0)
    codec.decoder.tile_frames = tile_frames
    tokens = [expected[f"{c}.semantic_tokens"] for c in CLIPS]
    tokens[0] = tokens[0][:3]  # shorter than a tile of 5, padded by most of the batch's length
    tokens.append(tokens[1][:0])  # an empty clip: nothing decoded, silence
    lengths = torch.tensor([t.shape[0] for t in tokens])
    codes = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    voices = torch.cat([expected[f"{c}.global_tokens"] for c in [*CLIPS, CLIPS[1]]])
    mask = (torch.arange(codes.shape[1]) < lengths[:, None]).float()[:, None]
    tail_lengths, tail_layouts = [], []
    tail = codec.decoder.tail

    def recording_tail(states, *args):
        tail_lengths.append(states.shape[-1])
        tail_layouts.append(states.stride(1) == 1)  # time-major
        return tail(states, *args)

    codec.decoder.tail = recording_tail
    with torch.no_grad():
        inputs = codec.decoder_inputs(codes, voices, mask)
        pitch = codec.pitch_of_decoder_inputs(inputs, mask)
        harmonics = codec.harmonic_synthesizer(inputs, mask, pitch.frequencies, pitch.voiced)
        tiled = codec.decoder(inputs, mask, harmonics)
    stride = codec.config.upsampling_rates[0]
    steps = [-(-int(length) // tile_frames) for length in lengths]  # tiles per clip, rounded up
    assert len(tail_lengths) == sum(steps) and all(tail_layouts)
    assert max(tail_lengths) <= tile_frames * stride + 2 * codec.decoder.tail_reach()
    whole = codec.decoder(inputs, mask, harmonics)  # autograd records: one call over the whole padded batch
    assert whole.requires_grad and len(tail_lengths) == sum(steps) + 1 and not tail_layouts[-1]
    torch.testing.assert_close(tiled, whole.detach(), atol=1e-5, rtol=0)
    for index, length in enumerate(lengths * codec.config.hop_length):
        assert not tiled[index, length:].any()


def test_tiled_wave_generator_keeps_long_lengths_in_bfloat16(bicodec):
    """A bf16 codec's mask counts lengths past 256 exactly (bf16 itself rounds 301 to 300): each clip gets all its
    samples and no padding."""
    decoder = copy.deepcopy(bicodec[0].decoder).to(torch.bfloat16)
    lengths = torch.tensor([301, 257])
    mask = (torch.arange(310) < lengths[:, None]).to(torch.bfloat16)[:, None]
    torch.manual_seed(0)
    inputs = torch.randn(2, bicodec[0].config.hidden_size, 310, dtype=torch.bfloat16)
    with torch.no_grad():
        audio = decoder(inputs, mask)
    hop = bicodec[0].config.hop_length
    for item, length in enumerate(lengths.tolist()):
        assert audio[item, (length - 1) * hop : length * hop].abs().sum() > 0
        assert not audio[item, length * hop :].any()


def test_codec_with_harmonics_batches_and_round_trips(bicodec, expected, tmp_path):
    from gpa_hf import BiCodecModel

    codec = codec_with_harmonics(bicodec)
    with torch.no_grad():  # a voiced, audible synthesiser whatever the tokens
        codec.pitch_predictor.proj.bias.copy_(torch.tensor([0.2, 5.0]))
        codec.harmonic_synthesizer.proj.bias.fill_(3.0)
    tokens = [expected[f"{c}.semantic_tokens"] for c in CLIPS]
    lengths = torch.tensor([t.shape[0] for t in tokens])
    voices = torch.cat([expected[f"{c}.global_tokens"] for c in CLIPS])
    with torch.no_grad():
        batch = codec.decode(torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True), voices, lengths)
        plain = bicodec[0].decode(tokens[0][None], voices[:1]).audio_values[0]
        alones = [codec.decode(t[None], voices[i : i + 1]).audio_values[0] for i, t in enumerate(tokens)]
        for index, alone in enumerate(alones):
            length = int(batch.audio_lengths[index])
            # float noise in the predicted pitch (1e-7) accumulates in the harmonics' phase over a clip
            torch.testing.assert_close(batch.audio_values[index, :length], alone, atol=ATOL, rtol=0)
            assert not batch.audio_values[index, length:].any()
        assert (batch.audio_values[0, : plain.numel()] - plain).abs().max() > 0.01  # the harmonics sound
    codec.save_pretrained(tmp_path)
    loaded = BiCodecModel.from_pretrained(tmp_path).eval()
    assert loaded.config.harmonic_count == 4
    with torch.no_grad():
        again = loaded.decode(tokens[1][None], voices[1:2]).audio_values[0]
    torch.testing.assert_close(again, alones[1], atol=ATOL, rtol=0)


def test_harmonic_settings_are_checked(bicodec, expected):
    from gpa_hf import BiCodecConfig

    with pytest.raises(ValueError, match="harmonic_count must be >= 0"):
        BiCodecConfig(harmonic_count=-1)
    with pytest.raises(ValueError, match="no harmonic synthesiser"):
        bicodec[0].pitch(expected["000.semantic_tokens"][None], expected["000.global_tokens"])


# ---- the optional magnitude refiner ---------------------------------------------------------------------------
def codec_with_magnitude_refiner(bicodec):
    """The fixture codec plus a small magnitude refiner."""
    changes = {"magnitude_n_fft": 640, "magnitude_dim": 32, "magnitude_num_layers": 1}
    return codec_with_new_modules(bicodec, ("magnitude_refiner",), **changes)


def test_magnitude_refiner_frames_are_the_stft_and_add_back_to_the_audio(bicodec, expected):
    refiner = codec_with_magnitude_refiner(bicodec).magnitude_refiner
    audio = expected["000.decoded_wav"][None]
    frames = refiner.frames(audio)
    stft = torch.stft(audio, 640, 160, window=torch.hann_window(640), pad_mode="constant", return_complex=True)
    torch.testing.assert_close(frames, torch.cat([stft.real, stft.imag], dim=1), atol=1e-4, rtol=0)
    every_frame = torch.ones(1, 1, frames.shape[-1])
    torch.testing.assert_close(refiner.overlap_add(frames, every_frame, audio.shape[-1]), audio, atol=1e-5, rtol=0)


def test_magnitude_refiner_sets_the_magnitudes_and_keeps_the_phase(bicodec, expected):
    refiner = codec_with_magnitude_refiner(bicodec).magnitude_refiner
    audio = expected["000.decoded_wav"][None]
    mask = torch.ones(1, 1, audio.shape[-1] // 320)
    own = refiner.magnitudes(refiner.frames(audio)).clamp(min=1e-8).log()
    torch.testing.assert_close(refiner.with_magnitudes(audio, own, mask), audio, atol=1e-4, rtol=0)
    halved = refiner.with_magnitudes(audio, own + np.log(0.5), mask)
    torch.testing.assert_close(halved, audio / 2, atol=1e-4, rtol=0)
    louder_highs = own + torch.linspace(0, 2, own.shape[1])[:, None]  # +17 dB at 8 kHz
    assert (refiner.with_magnitudes(audio, louder_highs, mask) - audio).abs().max() > 0.01


def test_codec_with_magnitude_refiner_batches_and_round_trips(bicodec, expected, tmp_path):
    """Each item of a padded batch is refined as it is alone (frames past its end are left out of the overlap-add),
    and zeros past its end; the codec saves and loads with its refiner."""
    from gpa_hf import BiCodecModel
    from gpa_hf.modeling_bicodec import lengths_to_mask

    codec = codec_with_magnitude_refiner(bicodec)
    tokens = [expected[f"{c}.semantic_tokens"] for c in CLIPS]
    lengths = torch.tensor([t.shape[0] for t in tokens])
    voices = torch.cat([expected[f"{c}.global_tokens"] for c in CLIPS])
    padded = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    mask = lengths_to_mask(lengths, padded.shape[1])
    with torch.no_grad():
        hidden = codec.decoder_inputs(padded, voices, mask)
        plain = bicodec[0].decode(padded, voices, lengths).audio_values
        batch = codec.magnitude_refiner(plain, hidden, mask)
        for index, length in enumerate(lengths.tolist()):
            alone = codec.magnitude_refiner(
                plain[index : index + 1, : length * 320],
                hidden[index : index + 1, :, :length],
                mask[index : index + 1, :, :length],
            )[0]
            torch.testing.assert_close(batch[index, : length * 320], alone, atol=1e-5, rtol=0)
            assert not batch[index, length * 320 :].any()
        decoded = codec.decode(padded, voices, lengths).audio_values
    torch.testing.assert_close(decoded, batch, atol=1e-5, rtol=0)
    assert (decoded - plain).abs().max() > 0.01  # the refiner changes the audio
    codec.save_pretrained(tmp_path)
    loaded = BiCodecModel.from_pretrained(tmp_path).eval()
    assert loaded.config.magnitude_n_fft == 640
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(padded, voices, lengths).audio_values, decoded, atol=1e-6, rtol=0)


def test_magnitude_refiner_settings_are_checked():
    from gpa_hf import BiCodecConfig

    with pytest.raises(ValueError, match="magnitude_n_fft must be >= 0"):
        BiCodecConfig(magnitude_n_fft=-1)
    with pytest.raises(ValueError, match="magnitude_hop_length=300 must divide hop_length=320"):
        BiCodecConfig(magnitude_n_fft=640, magnitude_hop_length=300)


def test_fresh_codec_starts_its_speaker_conditioned_norms_as_layer_norms(bicodec):
    """A codec built from its config (to train it) starts each speaker-conditioned norm as a plain LayerNorm (scale
    1, shift 0 whatever the d-vector). transformers skips `_init_weights` for modules without direct parameters,
    so the norm itself cannot set its projections."""
    from gpa_hf import BiCodecModel
    from gpa_hf.modeling_bicodec import BiCodecAdaLayerNorm

    codec = BiCodecModel(bicodec[0].config)
    norms = [module for module in codec.modules() if isinstance(module, BiCodecAdaLayerNorm)]
    assert norms
    for norm in norms:
        assert not norm.scale.weight.any() and torch.equal(norm.scale.bias, torch.ones_like(norm.scale.bias))
        assert not norm.shift.weight.any() and not norm.shift.bias.any()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), [(3, 2, 0, 1), (10, 5, 2, 2)])
def test_time_major_convolutions_equal_the_plain_ones(transposed, kernel, stride, padding, dilation):
    """`BiCodecTimeMajorConv1d` (the semantic model's plain convolutions, the wave generator's) and
    `BiCodecTimeMajorConvTranspose1d` give their `torch.nn` parents' outputs and gradients for time-major and
    channel-major inputs, and keep a time-major input's layout: the next layer copies nothing."""
    from gpa_hf.modeling_bicodec import BiCodecTimeMajorConv1d, BiCodecTimeMajorConvTranspose1d

    torch.manual_seed(0)
    parent = torch.nn.ConvTranspose1d if transposed else torch.nn.Conv1d
    plain = parent(24, 16, kernel, stride=stride, padding=padding, dilation=dilation)
    time_major = copy.deepcopy(plain)
    time_major.__class__ = BiCodecTimeMajorConvTranspose1d if transposed else BiCodecTimeMajorConv1d
    for inputs in (torch.randn(2, 300, 24).transpose(1, 2), torch.randn(2, 24, 300)):
        inputs.requires_grad_(True)
        expected, output = plain(inputs), time_major(inputs)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
        assert (output.stride(1) == 1) == (inputs.stride(1) == 1)
        grads = torch.autograd.grad(output.square().sum(), (inputs, time_major.weight))
        expected_grads = torch.autograd.grad(expected.square().sum(), (inputs, plain.weight))
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_residual_unit_initialises_as_dacs():
    """BiCodec's residual unit builds DAC's layers once, in DAC's order: the same weights from the same seed, and the
    same random numbers left after it (the gpa-tiny recipe's codec initialisation depends on both)."""
    from transformers.models.dac.modeling_dac import DacResidualUnit

    from gpa_hf.modeling_bicodec import BiCodecResidualUnit

    torch.manual_seed(0)
    ours, after_ours = BiCodecResidualUnit(8, 3), torch.rand(4)
    torch.manual_seed(0)
    dacs, after_dacs = DacResidualUnit(8, 3), torch.rand(4)
    assert ours.state_dict().keys() == dacs.state_dict().keys()
    assert all(torch.equal(value, dacs.state_dict()[key]) for key, value in ours.state_dict().items())
    assert torch.equal(after_ours, after_dacs)
    assert ours.conv1.dilation == dacs.conv1.dilation and ours.conv1.padding == dacs.conv1.padding


def test_semantic_model_convolves_its_feature_encoder_time_major(bicodec):
    from gpa_hf.modeling_bicodec import BiCodecTimeMajorConv1d

    semantic_model = bicodec[0].semantic_model
    convolutions = [layer.conv for layer in semantic_model.feature_extractor.conv_layers]
    assert all(type(conv) is BiCodecTimeMajorConv1d for conv in convolutions)
    assert not isinstance(semantic_model.encoder.pos_conv_embed.conv, BiCodecTimeMajorConv1d)  # grouped, weight-normed


@pytest.mark.parametrize("dilation", [1, 3, 9])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_dilated_convolution_equals_the_float64_convolution(dilation, bias):
    """The residual units' Winograd path (CPU, inference, float32) gives the convolution for lengths shorter and longer
    than a run of outputs, channel-major and time-major inputs, single and batched, and returns time-major output."""
    from gpa_hf.modeling_bicodec import BiCodecDilatedConv1d

    torch.manual_seed(0)
    conv = BiCodecDilatedConv1d(24, 16, kernel_size=7, dilation=dilation, padding=3 * dilation, bias=bias)
    conv.winograd_min_channels = 16
    conv.requires_grad_(False)
    for length in (5, 6 * dilation, 61):
        time_major_inputs = torch.randn(2, length, 24).transpose(1, 2)
        for inputs in (time_major_inputs, time_major_inputs.contiguous(), time_major_inputs[1:]):
            assert conv.uses_winograd(inputs)
            expected = F.conv1d(
                inputs.double(),
                conv.weight.double(),
                None if conv.bias is None else conv.bias.double(),
                padding=3 * dilation,
                dilation=dilation,
            )
            output = conv(inputs)
            assert output.shape == expected.shape and output.stride(1) == 1
            assert (output.double() - expected).norm() <= 3e-5 * expected.norm()


def test_winograd_path_is_inference_only_and_follows_weight_updates():
    """With autograd recording (the plain convolution's exact values), in bfloat16 or below `winograd_min_channels`
    the plain convolution runs; the cached transformed kernel follows in-place updates, loads (also of inference
    tensors, which keep no version) and casts."""
    from gpa_hf.modeling_bicodec import BiCodecDilatedConv1d

    torch.manual_seed(0)
    conv = BiCodecDilatedConv1d(16, 16, kernel_size=7, dilation=3, padding=9)
    conv.winograd_min_channels = 16
    inputs = torch.randn(1, 16, 40)

    def plain(module):
        return F.conv1d(inputs, module.weight, module.bias, padding=9, dilation=3)

    assert not conv.uses_winograd(inputs) and torch.equal(conv(inputs), plain(conv))
    with torch.no_grad():
        assert conv.uses_winograd(inputs) and not conv.uses_winograd(inputs.bfloat16())
        torch.testing.assert_close(conv(inputs), plain(conv), rtol=0, atol=5e-5)
        conv.weight.mul_(-2.0)
        torch.testing.assert_close(conv(inputs), plain(conv), rtol=0, atol=5e-5)
        conv.to(torch.bfloat16).float()
        assert conv._winograd_cache is None
        torch.testing.assert_close(conv(inputs), plain(conv), rtol=0, atol=5e-5)
    with torch.inference_mode():
        frozen = copy.deepcopy(conv)
        assert frozen.weight.is_inference()
        frozen(inputs)
        frozen.load_state_dict({"weight": conv.weight.flip(-1), "bias": conv.bias})
        torch.testing.assert_close(frozen(inputs), plain(frozen), rtol=0, atol=5e-5)
    conv.winograd_min_channels = 17
    with torch.no_grad():
        assert not conv.uses_winograd(inputs)


def test_wave_generator_with_winograd_convolutions_matches_reference(bicodec, expected, monkeypatch):
    """Every residual unit of the fixture codec on the Winograd path (published size: 192 channels and up): the
    batched decode still gives the reference's audio, each clip what it gets alone."""
    from gpa_hf.modeling_bicodec import BiCodecDilatedConv1d

    model, _ = bicodec
    monkeypatch.setattr(BiCodecDilatedConv1d, "winograd_min_channels", 1)
    units = [unit.conv1 for block in model.decoder.blocks for unit in block.res_units]
    tokens = [expected[f"{c}.semantic_tokens"] for c in CLIPS]
    padded = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    lengths = torch.tensor([t.shape[0] for t in tokens])
    globals_ = torch.cat([expected[f"{c}.global_tokens"] for c in CLIPS])
    with torch.no_grad():
        assert all(unit.uses_winograd(torch.zeros(1, unit.in_channels, 8)) for unit in units)
        batched = model.decode(padded, globals_, lengths)
        for index, clip in enumerate(CLIPS):
            length = int(batched.audio_lengths[index])
            assert_close(batched.audio_values[index, :length], expected[f"{clip}.decoded_wav"], clip)
            single = model.decode(tokens[index][None], globals_[index : index + 1]).audio_values[0]
            torch.testing.assert_close(batched.audio_values[index, :length], single, rtol=0, atol=1e-5)
