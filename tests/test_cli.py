"""The `gpa-hf` command line, on the published-layout fixture and on a converted folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, ORIGINAL_CHECKPOINT

from gpa_hf.cli import _generate_kwargs, build_parser, main

CLIP_000, CLIP_ASTRO = str(AUDIO / "000.wav"), str(AUDIO / "astro.wav")


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "gpa"
    assert main(["convert", str(ORIGINAL_CHECKPOINT), str(folder), "--default-voice", CLIP_ASTRO]) == 0
    return folder


@pytest.mark.parametrize("layout", ["original", "converted"])
def test_tokenize_json_matches_reference_and_decodes(layout, converted_folder, expected, capsys, tmp_path):
    model = str(ORIGINAL_CHECKPOINT) if layout == "original" else str(converted_folder)
    assert main(["tokenize", model, CLIP_000, CLIP_ASTRO, "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)
    assert list(tokens) == [CLIP_000, CLIP_ASTRO]
    for path, clip in ((CLIP_000, "000"), (CLIP_ASTRO, "astro")):
        assert tokens[path]["semantic"] == expected[f"{clip}.semantic_tokens"].tolist()
        assert tokens[path]["global"] == expected[f"{clip}.global_tokens"][0].tolist()
        assert tokens[path]["glm"] == expected[f"{clip}.glm_tokens"].tolist()
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    assert main(["decode", model, str(tmp_path / "tokens.json"), "--output-dir", str(tmp_path / "out")]) == 0
    audio, rate = sf.read(tmp_path / "out" / "000.wav", dtype="float32")
    assert rate == 16000 and audio.shape == (320 * 62,)
    torch.testing.assert_close(torch.from_numpy(audio), expected["000.decoded_wav"], atol=1e-4, rtol=1e-3)


def test_dry_run_prints_the_reference_prompt(expected_sequences, capsys):
    text = expected_sequences["inputs"]["text"]
    args = ["tts", str(ORIGINAL_CHECKPOINT), "--text", text, "--voice", CLIP_ASTRO, "--output", "x.wav", "--dry-run"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["input_ids"] == expected_sequences["cases"]["infer_tts"]["input_ids"]
    assert main(["asr", str(ORIGINAL_CHECKPOINT), CLIP_000, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["input_ids"] == expected_sequences["cases"]["infer_stt"]["input_ids"]


def test_tts_asr_vc_and_voice_commands(converted_folder, tmp_path, capsys):
    model = str(converted_folder)
    assert main(["tts", model, "--text", "Hello", "--output", str(tmp_path / "a.wav"), "--max-new-tokens", "8"]) == 0
    audio, rate = sf.read(tmp_path / "a.wav")
    assert rate == 16000 and audio.shape[0] % 320 == 0
    assert main(["voice", model, CLIP_000, "--output", str(tmp_path / "me.voice")]) == 0
    args = [
        "vc",
        model,
        "--source",
        CLIP_000,
        "--voice",
        str(tmp_path / "me.voice"),
        "--output",
        str(tmp_path / "v.wav"),
    ]
    assert main([*args, "--max-new-tokens", "8", "--greedy"]) == 0
    capsys.readouterr()
    assert main(["asr", model, CLIP_000, CLIP_ASTRO, "--json", "--max-new-tokens", "4"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == [CLIP_000, CLIP_ASTRO]


def test_streaming_tts_writes_the_same_audio(converted_folder, tmp_path, capsys):
    model = str(converted_folder)
    args = ["tts", model, "--text", "Hello there", "--greedy", "--max-new-tokens", "40"]
    assert main([*args, "--output", str(tmp_path / "offline.wav")]) == 0
    assert main([*args, "--stream", "--output", str(tmp_path / "stream.wav")]) == 0
    assert "first audio after" in capsys.readouterr().out
    offline, _ = sf.read(tmp_path / "offline.wav")
    streamed, rate = sf.read(tmp_path / "stream.wav")
    assert rate == 16000 and streamed.shape == offline.shape
    assert 10 * np.log10(np.sum(offline**2) / np.sum((offline - streamed) ** 2)) > 30


def test_static_decoding_flag_gives_the_same_audio(converted_folder, tmp_path, capsys):
    args = ["tts", str(converted_folder), "--text", "Hello there", "--greedy", "--max-new-tokens", "40"]
    assert main([*args, "--device", "cpu", "--output", str(tmp_path / "generate.wav")]) == 0
    assert main([*args, "--device", "cpu", "--static-decoding", "--output", str(tmp_path / "static.wav")]) == 0
    generated, _ = sf.read(tmp_path / "generate.wav")
    static, _ = sf.read(tmp_path / "static.wav")
    np.testing.assert_array_equal(static, generated)


@pytest.mark.parametrize(
    ("flags", "expected"), [([], None), (["--compile"], True), (["--compile", "triton"], "triton")]
)
def test_compile_flag_passes_its_mode(flags, expected):
    args = build_parser().parse_args(["tts", "--text", "one", "--output", "one.wav", "--static-decoding", *flags])
    assert _generate_kwargs(args).get("compile_decoding") == expected


def test_compile_takes_no_model_folder_for_a_mode(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["tts", "--static-decoding", "--compile", "gpa-0.3b", "--text", "one", "--output", "a"]
        )
    assert "invalid choice: 'gpa-0.3b'" in capsys.readouterr().err


def test_errors_exit_non_zero_without_traceback(converted_folder, tmp_path, capsys):
    assert main(["asr", str(converted_folder), str(tmp_path / "missing.wav")]) == 1
    err = capsys.readouterr().err
    assert "missing.wav': no such file" in err and "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["decode", str(converted_folder), str(bad), "--output-dir", str(tmp_path)]) == 1
    assert "expected a JSON object" in capsys.readouterr().err
