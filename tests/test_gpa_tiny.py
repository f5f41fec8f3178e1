"""The embedded default model, gpa-tiny: every task works offline and gives real outputs on held-out speech."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import FIXTURES
from transformers import pipeline

import gpa_hf
from gpa_hf.cli import main
from gpa_hf.evaluation_gpa import error_rate

HELDOUT = FIXTURES / "gpa_tiny_heldout"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    """Held-out clips (text and voices the model never saw in training), with their transcripts."""
    return [{**row, "audio": str(HELDOUT / row["audio"])} for row in json.loads((HELDOUT / "clips.json").read_text())]


def assert_speech(audio: np.ndarray, min_seconds: float, max_seconds: float) -> None:
    seconds = audio.shape[0] / 16000
    assert min_seconds <= seconds <= max_seconds, f"{seconds:.2f} s of audio"
    assert np.sqrt(np.mean(audio**2)) > 0.01, "the audio is (nearly) silent"


def test_default_model_is_embedded_and_small():
    files = {path.name: path.stat().st_size for path in Path(gpa_hf.DEFAULT_MODEL).iterdir()}
    assert "model.safetensors" in files and "default_voice.safetensors" in files
    assert sum(files.values()) <= 40 * 1024**2


def test_model_folder_card_is_the_model_cards_copy():
    """The card ships twice (the model folder's README.md, for save_pretrained / the Hub, and model_cards/): the
    two must not drift apart."""
    card = Path(gpa_hf.__file__).parent / "model_cards" / "gpa-tiny.md"
    assert (Path(gpa_hf.DEFAULT_MODEL) / "README.md").read_text() == card.read_text()


def test_tts_without_naming_a_model(tmp_path, capsys):
    output = tmp_path / "digits.wav"
    assert main(["tts", "--text", "three one four", "--output", str(output), "--seed", "0"]) == 0
    audio, rate = sf.read(output)
    assert rate == 16000
    assert_speech(audio, 0.4, 4.0)


def test_asr_of_held_out_clips_is_close_to_the_transcripts(heldout, capsys):
    assert main(["asr", *[row["audio"] for row in heldout], "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)
    predictions = [texts[row["audio"]] for row in heldout]
    assert error_rate([row["text"] for row in heldout], predictions, "char") <= 0.25, predictions


def test_asr_of_clips_that_sound_recorded(heldout, capsys):
    """Recordings rarely start with the speech, nor come at one level: gpa-tiny trained on clips with silence around
    them, quieter, noisier (an LM trained on espeak-ng's clips alone misread clips after 40 ms of silence)."""
    noise = np.random.default_rng(0)
    padded = []
    for index, row in enumerate(heldout):
        speech, rate = sf.read(row["audio"], dtype="float32")
        silence = np.zeros(int((0.2 + 0.1 * index) * rate), dtype=np.float32)
        clip = np.concatenate([silence, speech, silence]) * 0.1  # 20 dB quieter
        padded.append({"array": clip + 1e-4 * noise.standard_normal(clip.size), "sampling_rate": rate})
    asr = pipeline("automatic-speech-recognition", model=gpa_hf.DEFAULT_MODEL)
    predictions = [result["text"] for result in asr(padded, batch_size=4)]
    assert error_rate([row["text"] for row in heldout], predictions, "char") <= 0.25, predictions


def test_a_long_recording_is_transcribed_utterance_by_utterance(heldout, tmp_path, capsys):
    """Four held-out utterances with pauses between them: longer than one prompt of gpa-tiny takes, so it is cut at
    the pauses; in one prompt (which the processor refuses) gpa-tiny loses most of it."""
    parts = []
    for row in heldout:
        speech, rate = sf.read(row["audio"], dtype="float32")
        parts += [np.zeros(rate // 2, dtype=np.float32), speech]
    recording = tmp_path / "long.wav"
    sf.write(recording, np.concatenate(parts), rate)
    processor = gpa_hf.GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)
    assert sf.info(recording).duration > processor.max_source_seconds
    with pytest.raises(ValueError, match="max_source_seconds"):
        processor(task="asr", audio=str(recording))
    assert main(["asr", str(recording), "--json"]) == 0
    transcript = json.loads(capsys.readouterr().out)[str(recording)]
    assert error_rate([" ".join(row["text"] for row in heldout)], [transcript], "char") <= 0.25, transcript


def test_long_text_is_spoken_in_pieces(tmp_path, capsys):
    """Twelve digits are twice what gpa-tiny was trained to say in one prompt: said in two pieces, all of them."""
    text = "six six zero four eight seven six four seven five nine three"
    assert len(text) > gpa_hf.GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL).max_text_characters
    for flags in ([], ["--stream"]):  # a stream streams the pieces one after another
        output = tmp_path / "twelve.wav"
        assert main(["tts", "--text", text, "--output", str(output), "--seed", "0", *flags]) == 0
        audio, _ = sf.read(output)
        assert_speech(audio, 3.5, 12.0)  # one prompt: 2.1-3.2 s, about six digits


def test_int8_lm_transcribes_about_as_well_as_float32(heldout, capsys):
    """Int8 rounding may change a word (on the recipe's 100 held-out clips: CER 0.9% against 1.1% in float32), eagerly
    (fbgemm) and in a compiled CPU step (oneDNN's int8 products, its input quantized with all 8 bits)."""
    clips = [row["audio"] for row in heldout]
    rates = []
    for flags in ([], ["--int8"], ["--int8", "--static-decoding", "--compile"]):
        assert main(["asr", *clips, "--json", *flags]) == 0
        texts = json.loads(capsys.readouterr().out)
        rates.append(error_rate([row["text"] for row in heldout], [texts[clip] for clip in clips], "char"))
    assert max(rates[1:]) <= rates[0] + 0.15, rates


def test_bfloat16_audio_tokenizers_transcribe_and_speak(heldout, tmp_path, capsys):
    assert main(["asr", *[row["audio"] for row in heldout], "--json", "--bf16-audio-tokenizers"]) == 0
    texts = json.loads(capsys.readouterr().out)
    predictions = [texts[row["audio"]] for row in heldout]
    assert error_rate([row["text"] for row in heldout], predictions, "char") <= 0.25, predictions
    output = tmp_path / "digits.wav"
    flags = ["--output", str(output), "--seed", "0", "--bf16-audio-tokenizers"]
    assert main(["tts", "--text", "three one four", *flags]) == 0
    audio, _ = sf.read(output)
    assert_speech(audio, 0.4, 4.0)


def test_vc_without_naming_a_model(heldout, tmp_path):
    output = tmp_path / "converted.wav"
    source, voice = heldout[0]["audio"], heldout[1]["audio"]
    assert main(["vc", "--source", source, "--voice", voice, "--output", str(output), "--seed", "0"]) == 0
    audio, _ = sf.read(output)
    source_seconds = sf.info(source).duration
    assert_speech(audio, 0.3 * source_seconds, 3 * source_seconds)


def test_text_to_speech_pipeline_on_the_default_model():
    tts = pipeline("text-to-speech", model=gpa_hf.DEFAULT_MODEL)
    result = tts("seven two", generate_kwargs={"do_sample": False})
    assert result["sampling_rate"] == 16000
    assert_speech(np.asarray(result["audio"]).reshape(-1), 0.3, 3.0)


def test_streaming_continues_the_harmonic_phase(heldout):
    """gpa-tiny's codec plays harmonics at a predicted pitch: a stream must carry their phase from window to window
    (chunks shorter than the left context make windows start inside earlier chunks) to equal the offline audio."""
    import torch

    model = gpa_hf.GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval()
    processor = gpa_hf.GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)
    assert model.config.bicodec_config.harmonic_count > 0
    inputs = processor(task="vc", audio=heldout[0]["audio"], voice=heldout[1]["audio"])
    settings = {"do_sample": False, "max_new_tokens": 200}
    offline = model.generate(**inputs, **settings, output_audio=True).audio[0]
    chunks = list(model.generate_stream(**inputs, **settings, first_chunk_tokens=3, chunk_tokens=5))
    hop = model.config.bicodec_config.hop_length
    assert offline.numel() >= 30 * hop  # chunks from token 28 on are decoded from windows past the stream's start
    joined = torch.cat(chunks)
    assert joined.numel() == offline.numel()
    snr = 10 * torch.log10(offline.pow(2).sum() / (offline - joined).pow(2).sum())
    assert snr > 30, float(snr)


def test_asr_robustness_changes_clips_as_described(heldout):
    """`asr_robustness.py`'s changes do what its table says: the level of the noise and of the echo, the band of the
    telephone, the silences, and long recordings of four clips with their four transcripts."""
    sys.path.insert(0, str(EXAMPLES / "gpa_tiny"))
    import asr_robustness

    clip = sf.read(heldout[0]["audio"], dtype="float32")[0]
    generator = np.random.default_rng(0)

    def decibels(signal: np.ndarray, reference: np.ndarray) -> float:
        return 10 * np.log10(np.sum(signal.astype(np.float64) ** 2) / np.sum(reference.astype(np.float64) ** 2))

    noisy = asr_robustness.with_noise(20)(clip, generator)
    assert decibels(noisy - clip, clip) == pytest.approx(-20, abs=0.5)
    padded = asr_robustness.with_noise(40, asr_robustness.padded(1.0, 0.5))(clip, generator)
    assert padded.size == clip.size + 24000
    assert decibels(padded[16000:-8000] - clip, clip) == pytest.approx(-40, abs=0.5)  # the speech in its place
    assert decibels(padded[:16000], clip) == pytest.approx(-40 + 10 * np.log10(16000 / clip.size), abs=0.5)
    echoed = asr_robustness.room(0.05, 0.0)(clip, generator)
    assert echoed.size == clip.size and decibels(echoed - clip, clip) == pytest.approx(0, abs=2.0)  # one draw
    hall = asr_robustness.room(0.3, 6.0)(clip, generator)
    assert decibels(hall - clip, clip) == pytest.approx(6, abs=2.0)
    telephone = np.abs(np.fft.rfft(asr_robustness.telephone(clip, generator)))
    band = np.fft.rfftfreq(clip.size, 1 / 16000) > 4100
    assert decibels(telephone[band], np.abs(np.fft.rfft(clip))[band]) < -40
    assert decibels(asr_robustness.quieter(26)(clip, generator), clip) == pytest.approx(-26, abs=1e-3)

    clips = [sf.read(row["audio"], dtype="float32")[0] for row in heldout]
    recordings, transcripts = asr_robustness.long_recordings(clips, [row["text"] for row in heldout], generator)
    assert transcripts == [" ".join(row["text"] for row in heldout)]
    pauses = (recordings[0].size - sum(c.size for c in clips)) / 16000
    assert 3 * 0.3 <= pauses <= 3 * 0.8


def test_asr_robustness_reports_every_change(heldout, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(EXAMPLES / "gpa_tiny"))
    import asr_robustness

    rows = [{"task": "stt", "audio": Path(row["audio"]).name, "text": row["text"]} for row in heldout]
    argv = ["asr_robustness.py", "--corpus", str(tmp_path), "--output", str(tmp_path / "r.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError, match=r"heldout_asr\.jsonl: no such file"):
        asr_robustness.main()
    (tmp_path / "heldout_asr.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in heldout:
        (tmp_path / Path(row["audio"]).name).symlink_to(row["audio"])
    assert asr_robustness.main() == 0
    printed = capsys.readouterr().out
    conditions = json.loads((tmp_path / "r.json").read_text())["conditions"]
    assert list(conditions) == [*asr_robustness.CHANGES, asr_robustness.LONG_RECORDINGS]
    for name, result in conditions.items():
        assert f"{name:74s} {result['cer']:6.1%}" in printed
    assert len(conditions[asr_robustness.LONG_RECORDINGS]["items"]) == 1
    assert all(
        len(result["items"]) == len(heldout) for name, result in conditions.items() if name in asr_robustness.CHANGES
    )
    as_made = conditions["the clips as espeak-ng made them"]
    assert main(["asr", *[row["audio"] for row in heldout], "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)
    assert [item["prediction"] for item in as_made["items"]] == [texts[row["audio"]] for row in heldout]
