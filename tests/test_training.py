"""Training data preparation, the collator, a Trainer step, evaluation metrics and the prepare-data / eval CLI."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, FIXTURES, ORIGINAL_CHECKPOINT, SHARED_DATA

from gpa_hf.audio_utils import pitch_track
from gpa_hf.cli import main
from gpa_hf.data_gpa import (
    GpaDataCollator,
    GpaTrainingDataBuilder,
    PreparationReport,
    add_semantic_input_noise,
    load_jsonl_dataset,
    prepare_dataset,
)
from gpa_hf.evaluation_gpa import (
    GpaErrorRate,
    error_rate,
    evaluate_gpa,
    median_pitch,
    normalize_text,
    pitch_closer_to_target,
    write_report,
)

TEXT = "Hello world, this is Major Tom speaking."
SAMPLE_JSONL = SHARED_DATA / "merged_shuffled_train.jsonl"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    return path


def fixture_rows() -> list[dict]:
    """The clips and text of the reference's train_* sequences (a = 000.wav, b = astro.wav)."""
    a, b = str(AUDIO / "000.wav"), str(AUDIO / "astro.wav")
    return [
        {"task": "stt", "audio": a, "text": TEXT},
        {"task": "tts-a", "audio": a, "ref_audio": b, "text": TEXT},
        {"task": "vc", "audio": a, "ref_audio": b, "vc_audio": b},
    ]


def require_sample_data() -> None:
    assert SAMPLE_JSONL.is_file(), f"{SAMPLE_JSONL} is missing: these tests need ../shared/data beside the repository"


def test_prepared_sequences_equal_reference_training_sequences(gpa, expected_sequences, tmp_path):
    model, processor = gpa
    dataset = load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", fixture_rows()))
    prepared, report = prepare_dataset(dataset, model, processor, cache_dir=tmp_path / "cache")
    assert report.num_skipped == 0 and prepared["task"] == ["asr", "tts", "vc"]
    for row, case in zip(prepared, ("train_stt", "train_tts", "train_vc")):
        assert row["input_ids"] == expected_sequences["cases"][case]["input_ids"], case
        assert row["labels"] == expected_sequences["cases"][case]["labels"], case


def test_relative_paths_and_segments_from_a_jsonl_file(gpa, tmp_path):
    model, processor = gpa
    samples, rate = sf.read(AUDIO / "astro.wav", dtype="float32")
    sf.write(tmp_path / "long.wav", samples, rate)
    rows = [
        {"task": "stt", "audio": "long.wav", "text": TEXT, "begin_time": -1, "end_time": -1},
        {"task": "stt", "audio": "long.wav", "text": TEXT, "begin_time": 1.0, "end_time": 2.5},
    ]
    prepared, _ = prepare_dataset(
        load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", rows)), model, processor, cache_dir=tmp_path / "c"
    )
    layout = model.config.layout
    start, stop = layout.semantic_offset, layout.semantic_offset + layout.semantic_size
    semantic = [sum(start <= i < stop for i in ids) for ids in prepared["input_ids"]]
    features = processor.feature_extractor
    assert semantic == [features.semantic_length(len(samples)), features.semantic_length(round(1.5 * rate))]


def test_sample_jsonl_prepares_and_reports_missing_files(gpa, tmp_path):
    require_sample_data()
    model, processor = gpa
    dataset = load_jsonl_dataset(SAMPLE_JSONL)
    prepared, report = prepare_dataset(dataset, model, processor, max_length=100_000, cache_dir=tmp_path / "cache")
    assert report.skipped == {"asr": {"missing audio file": 7}}
    assert report.kept == {"asr": 26, "tts": 20}
    assert len(prepared) == 46
    # Kept rows keep their input order: the ASR targets are the transcripts of the rows whose file exists.
    kept = [row["text"].strip() for row in dataset if row["task"] == "stt" and Path(row["audio"]).is_file()]
    targets = [[i for i, label in zip(r["input_ids"], r["labels"]) if label != -100] for r in prepared]
    assert [processor.decode_text(t) for t, r in zip(targets, prepared) if r["task"] == "asr"] == kept
    assert "missing audio file" in str(report)

    # A second run reads the cache: the tokenizer is never called.
    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    original = GpaTrainingDataBuilder._tokenize
    GpaTrainingDataBuilder._tokenize = fail
    try:
        again, again_report = prepare_dataset(
            dataset, model, processor, max_length=100_000, cache_dir=tmp_path / "cache"
        )
    finally:
        GpaTrainingDataBuilder._tokenize = original
    assert again["input_ids"] == prepared["input_ids"] and again_report.to_dict() == report.to_dict()


def test_rows_that_cannot_be_used_are_counted_not_cut(gpa, tmp_path):
    model, processor = gpa
    a = str(AUDIO / "000.wav")
    rows = [
        {"task": "stt", "audio": a, "text": TEXT},
        {"task": "stt", "audio": str(tmp_path / "gone.wav"), "text": TEXT},
        {"task": "stt", "audio": str(write_jsonl(tmp_path / "x.jsonl", [{}])), "text": TEXT},
        {"task": "translate", "audio": a, "text": TEXT},
        {"task": "stt", "audio": a, "text": "  "},
        {"task": "tts-a", "audio": a, "text": TEXT * 20},
    ]
    dataset = load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", rows))
    prepared, report = prepare_dataset(dataset, model, processor, max_length=200, cache_dir=tmp_path / "cache")
    assert len(prepared) == 1 and all(len(ids) <= 200 for ids in prepared["input_ids"])
    assert report.skipped["asr"] == {"missing audio file": 1, "unreadable audio": 1, "empty text": 1}
    assert report.skipped["translate"] == {"unknown task (expected one of ['asr', 'stt', 'tts', 'tts-a', 'vc'])": 1}
    assert report.skipped["tts"] == {"longer than max_length (200 tokens)": 1}


def test_datasets_audio_column_gives_the_same_sequences(gpa, tmp_path):
    from datasets import Audio, Dataset

    model, processor = gpa
    rows = fixture_rows()[:2]
    expected, _ = prepare_dataset(
        load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", rows)), model, processor, cache_dir=tmp_path / "c1"
    )
    dataset = Dataset.from_dict({"audio": [r["audio"] for r in rows], "text": [TEXT, TEXT]})
    dataset = dataset.cast_column("audio", Audio(sampling_rate=16000))
    dataset = dataset.add_column("ref_audio", ["", rows[1]["ref_audio"]])
    dataset = dataset.add_column("task", ["asr", "tts"])
    prepared, _ = prepare_dataset(dataset, model, processor, cache_dir=tmp_path / "c2")
    assert prepared["input_ids"] == expected["input_ids"] and prepared["labels"] == expected["labels"]
    with pytest.raises(ValueError, match="no 'task' column"):
        prepare_dataset(dataset.remove_columns("task"), model, processor, cache_dir=tmp_path / "c3")


def test_collator_pads_right_with_masked_labels():
    collator = GpaDataCollator(pad_token_id=7, pad_to_multiple_of=4)
    batch = collator([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [4, 7, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    with pytest.raises(ValueError, match="differ in length"):
        collator([{"input_ids": [1, 2], "labels": [1]}])


def test_trainer_step_on_a_tiny_model(converted, tmp_path):
    from gpa_hf import GpaForConditionalGeneration, GpaProcessor, build_trainer

    model = GpaForConditionalGeneration.from_pretrained(converted)
    processor = GpaProcessor.from_pretrained(converted)
    dataset = load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", fixture_rows() * 2))
    prepared, _ = prepare_dataset(dataset, model, processor, cache_dir=tmp_path / "cache")
    bicodec_weights = {k: v.clone() for k, v in model.bicodec.state_dict().items()}
    lm_before = model.model.embed_tokens.weight.detach().clone()
    trainer = build_trainer(
        model,
        processor,
        prepared,
        str(tmp_path / "out"),
        eval_fraction=0.2,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    assert len(trainer.eval_dataset) == 1 and len(trainer.train_dataset) == 5
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert not torch.equal(model.model.embed_tokens.weight, lm_before)
    assert all(torch.equal(v, model.bicodec.state_dict()[k]) for k, v in bicodec_weights.items())


def test_finetune_command_trains_the_lm_and_saves_a_loadable_model(converted, tmp_path):
    from gpa_hf import GpaForConditionalGeneration, GpaProcessor

    data = write_jsonl(tmp_path / "rows.jsonl", fixture_rows() * 2)
    out = tmp_path / "finetuned"
    arguments = ["finetune", str(converted), str(data), "--output-dir", str(out), "--max-steps", "2"]
    options = ["--learning-rate", "1e-2", "--eval-fraction", "0.2", "--gradient-checkpointing"]
    assert main([*arguments, *options, "--micro-batches-by-length", "2"]) == 0
    before = GpaForConditionalGeneration.from_pretrained(converted)
    after = GpaForConditionalGeneration.from_pretrained(out)
    assert not torch.equal(after.model.embed_tokens.weight, before.model.embed_tokens.weight)
    frozen = after.bicodec.state_dict()
    assert all(torch.equal(value, frozen[key]) for key, value in before.bicodec.state_dict().items())
    assert (
        GpaProcessor.from_pretrained(out).tokenizer.vocab_size
        == GpaProcessor.from_pretrained(converted).tokenizer.vocab_size
    )


def test_finetune_command_resumes_from_its_checkpoint_and_pushes_to_the_hub(converted, tmp_path, monkeypatch):
    from gpa_hf import GpaForConditionalGeneration, GpaProcessor

    pushed = []
    for cls in (GpaForConditionalGeneration, GpaProcessor):
        monkeypatch.setattr(cls, "push_to_hub", lambda self, repo_id, **kwargs: pushed.append((type(self), repo_id)))
    data = write_jsonl(tmp_path / "rows.jsonl", fixture_rows() * 2)  # 5 training rows: 3 steps an epoch
    out = tmp_path / "finetuned"
    arguments = ["finetune", str(converted), str(data), "--output-dir", str(out), "--eval-fraction", "0.2"]
    assert main([*arguments, "--max-steps", "3", "--learning-rate", "1e-2"]) == 0
    assert (out / "checkpoint-3").is_dir()
    first = GpaForConditionalGeneration.from_pretrained(out).model.embed_tokens.weight
    # Resumed at its last step, no step is left, so another learning rate changes nothing (a fresh start would).
    assert main([*arguments, "--max-steps", "3", "--learning-rate", "5e-2", "--resume", "--push-to-hub", "me/x"]) == 0
    assert torch.equal(GpaForConditionalGeneration.from_pretrained(out).model.embed_tokens.weight, first)
    assert pushed == [(GpaForConditionalGeneration, "me/x"), (GpaProcessor, "me/x")]
    fresh = tmp_path / "fresh"
    assert main(["finetune", str(converted), str(data), "--output-dir", str(fresh), "--resume"]) == 1


def test_finetune_command_errors_name_the_problem(converted, tmp_path, monkeypatch, capsys):
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"task": "stt", "audio": "nowhere.wav", "text": TEXT}])
    out = str(tmp_path / "out")
    assert main(["finetune", str(converted), str(missing), "--output-dir", out]) == 1
    assert "no row could be prepared" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)  # as when peft is not installed
    data = write_jsonl(tmp_path / "rows.jsonl", fixture_rows())
    assert main(["finetune", str(converted), str(data), "--output-dir", out, "--lora"]) == 1
    assert "pip install 'gpa-hf[lora]'" in capsys.readouterr().err


def test_trainer_groups_rows_by_prompt_length(gpa, tmp_path):
    from datasets import concatenate_datasets

    from gpa_hf.training_gpa import build_trainer

    model, processor = gpa
    dataset = load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", fixture_rows()))
    prepared, _ = prepare_dataset(dataset, model, processor, cache_dir=tmp_path / "cache")
    by_length = sorted(range(len(prepared)), key=lambda i: len(prepared[i]["input_ids"]))
    two_lengths = concatenate_datasets([prepared.select([by_length[0], by_length[-1]])] * 32)  # 64 rows
    trainer = build_trainer(
        model,
        processor,
        two_lengths,
        str(tmp_path / "out"),
        eval_fraction=0.0,
        per_device_train_batch_size=4,
        train_sampling_strategy="group_by_length",
    )
    batches = list(trainer.get_train_dataloader())
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 64
    # Rows are sorted by length within each run of 16 (4 runs), so at most 4 of the 16 batches mix the two lengths;
    # random batches of 4 would mix them 14 times in 16 on average.
    mixed = sum(int(batch["attention_mask"].sum(-1).unique().numel() > 1) for batch in batches)
    assert mixed <= 4


def test_micro_batches_by_length_give_the_whole_batch_loss_and_gradient(gpa, tmp_path):
    from gpa_hf.training_gpa import build_trainer

    model, processor = gpa
    dataset = load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", fixture_rows()))
    prepared, _ = prepare_dataset(dataset, model, processor, cache_dir=tmp_path / "cache")
    batch = GpaDataCollator(processor.pad_token_id)([prepared[i] for i in range(len(prepared))])
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.unique().numel() == 3  # three rows of different lengths: two of them padded
    targets = int((batch["labels"][:, 1:] != -100).sum())
    shapes = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    results = []
    try:
        for micro_batches in (1, 3):
            trainer = build_trainer(
                model, processor, prepared, str(tmp_path), eval_fraction=0.0, micro_batches_by_length=micro_batches
            )
            model.train()
            loss = trainer.compute_loss(model, batch, num_items_in_batch=targets)
            loss.backward()
            gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results.append((loss.detach(), gradients))
    finally:
        hook.remove()
        model.eval()
    # whole: one padded batch; in three: one row each, cut to its own length (shortest first), nothing else cut
    assert shapes == [tuple(batch["input_ids"].shape), *[(1, int(n)) for n in lengths.sort().values]]
    (whole_loss, whole), (split_loss, split) = results
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-5, atol=0)
    assert whole.keys() == split.keys() and whole
    for name, gradient in whole.items():
        torch.testing.assert_close(split[name], gradient, rtol=1e-4, atol=1e-4 * gradient.abs().max().item())
    with pytest.raises(ValueError, match="micro_batches_by_length must be at least 1, got 0"):
        build_trainer(model, processor, prepared, str(tmp_path / "out"), micro_batches_by_length=0)


def test_error_rates_match_hand_computed_values():
    # "the cat sat" vs "the cat sit down": one substitution + one insertion over 3 words.
    assert error_rate(["The cat, sat!"], ["the cat sit down"], "word") == pytest.approx(2 / 3)
    # Corpus rate: (2 + 0) edits over (3 + 2) words.
    assert error_rate(["the cat sat", "hello world"], ["the cat sit down", "Hello, world."], "word") == 0.4
    # CJK: spaces and punctuation are dropped; one substitution in four characters.
    assert error_rate(["今天 天气，好。"], ["今天天汽好"], "char") == pytest.approx(1 / 5)
    assert normalize_text("  Ｈｅｌｌｏ,  WORLD!! ") == "hello world"
    metric = GpaErrorRate()
    assert metric.compute(predictions=["a b"], references=["a c"], unit="word") == {"wer": 0.5}
    assert jiwer.wer("a c", "a b") == 0.5
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rate(["?!"], ["x"], "word")


def test_asr_and_tts_evaluation_reports(gpa, tmp_path):
    model, processor = gpa
    rows = [
        {"task": "stt", "audio": str(AUDIO / "000.wav"), "text": TEXT},
        {"task": "stt", "audio": str(tmp_path / "missing.wav"), "text": TEXT},
    ]
    report = evaluate_gpa(model, processor, rows, "asr", generate_kwargs={"max_new_tokens": 8})
    assert report["num_items"] == 1 and report["skipped"] == {"stt": {"missing audio file": 1}}
    item = report["items"][0]
    assert item["wer"] == error_rate([TEXT], [item["prediction"]], "word") == report["metrics"]["wer"]
    torch.manual_seed(1)  # the random-weight model samples a stop at once under some seeds
    tts = evaluate_gpa(
        model, processor, rows[:1], "tts", generate_kwargs={"max_new_tokens": 20}, audio_dir=tmp_path / "wav"
    )
    assert 0 < tts["items"][0]["duration_s"] <= 21 * 320 / 16000
    assert -1 <= tts["metrics"]["speaker_similarity"] <= 1
    assert (tmp_path / "wav" / "00000.wav").is_file()
    plot = write_report(tts, tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["task"] == "tts"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vc_evaluation_compares_target_and_source_similarity(gpa, tmp_path):
    model, processor = gpa
    rows = [{"task": "vc", "audio": str(AUDIO / "000.wav"), "ref_audio": str(AUDIO / "astro.wav")}]
    report = evaluate_gpa(model, processor, rows, "vc", generate_kwargs={"max_new_tokens": 20})
    item = report["items"][0]
    assert item["closer_to_target"] == (item["similarity_to_target"] > item["similarity_to_source"])
    assert report["metrics"]["closer_to_target_rate"] == float(item["closer_to_target"])
    pitch = item["pitch_hz"]
    assert 60 <= pitch["source"] <= 400 and 60 <= pitch["target"] <= 400  # both clips are speech
    assert item["pitch_closer_to_target"] == pitch_closer_to_target(pitch["output"], pitch["target"], pitch["source"])
    assert report["metrics"]["pitch_pairs"] == int(item["pitch_closer_to_target"] is not None)
    assert report["metrics"]["outputs_without_pitch"] == int(pitch["output"] is None)
    write_report(report, tmp_path / "vc.json")  # the pitch results are plain JSON values
    assert json.loads((tmp_path / "vc.json").read_text())["items"][0]["pitch_hz"] == pitch


def test_vc_codec_baseline_scores_the_codec_alone(gpa, tmp_path):
    """`gpa-hf eval --task vc --codec-baseline` scores each source's own tokens decoded in the target voice, as
    `codec_conversion` makes them one pair at a time."""
    from gpa_hf.audio_utils import load_audio
    from gpa_hf.evaluation_gpa import BiCodecSpeakerEmbedder, codec_conversion, cosine_similarity

    model, processor = gpa
    a, b = AUDIO / "000.wav", AUDIO / "astro.wav"
    pairs = [(a, b), (b, a)]
    data = write_jsonl(tmp_path / "vc.jsonl", [{"task": "vc", "audio": str(s), "ref_audio": str(t)} for s, t in pairs])
    args = ["eval", str(ORIGINAL_CHECKPOINT), str(data), "--task", "vc", "--codec-baseline", "--batch-size", "2"]
    assert main([*args, "--max-new-tokens", "20", "--output", str(tmp_path / "vc_report.json")]) == 0
    report = json.loads((tmp_path / "vc_report.json").read_text())

    embed = BiCodecSpeakerEmbedder(model, processor)
    sources, voices = [load_audio(s) for s, _ in pairs], [load_audio(t) for _, t in pairs]
    batched = codec_conversion(model, processor, sources, voices)
    closer = []
    for index, (source, voice) in enumerate(zip(sources, voices)):
        (alone,) = codec_conversion(model, processor, [source], [voice])
        hop = model.config.bicodec_config.hop_length
        assert alone.size == processor.feature_extractor.semantic_length(source.size) * hop
        np.testing.assert_allclose(batched[index], alone, atol=1e-4)  # a padded batch decodes each item as alone
        output = embed([alone])
        to_target = cosine_similarity(output, embed([voice])).item()
        to_source = cosine_similarity(output, embed([source])).item()
        similarity = report["items"][index]["codec_baseline_similarity"]
        assert similarity == {
            "to_target": pytest.approx(to_target, abs=1e-4),
            "to_source": pytest.approx(to_source, abs=1e-4),
        }
        closer.append(to_target > to_source)
    assert report["metrics"]["codec_baseline"]["closer_to_target_rate"] == np.mean(closer)
    # in the source's own voice it is BiCodec's round trip; in another voice, another waveform
    (round_trip,) = codec_conversion(model, processor, sources[:1], sources[:1])
    with torch.no_grad():
        expected = model.bicodec(**processor.feature_extractor.bicodec(sources[:1], sampling_rate=16000)).audio_values
    np.testing.assert_allclose(round_trip, expected[0].numpy(), atol=1e-5)
    assert not np.allclose(batched[0], round_trip, atol=1e-3)
    assert "codec_baseline" not in evaluate_gpa(model, processor, [], "vc")["metrics"]


def test_pitch_track_follows_the_pitch_frame_by_frame():
    time_s = np.arange(16000) / 16000
    voiced = np.where(time_s < 0.5, np.sin(2 * np.pi * 123.0 * time_s) + 0.3 * np.sin(4 * np.pi * 123.0 * time_s), 0)
    track = pitch_track(voiced, 16000, hop_length=160, window_length=640)
    assert track.shape == (100,)  # one frame per started hop
    assert np.allclose(track[3:47], 123.0, rtol=0.01)
    assert not track[53:].any()  # silence after 0.5 s (frames whose window reaches the tone are voiced)
    assert pitch_track(np.zeros(16001), hop_length=160).shape == (101,)
    assert pitch_track(np.zeros(0)).shape == (0,)


def test_median_pitch_finds_the_fundamental_and_nothing_in_noise():
    time_s = np.arange(32000) / 16000
    for hertz in (80, 110, 220, 330):
        tone = sum(np.sin(2 * np.pi * hertz * k * time_s) / k for k in range(1, 6))  # five harmonics
        assert median_pitch(tone) == pytest.approx(hertz, rel=0.02)
    gliding = np.sin(2 * np.pi * np.cumsum(np.linspace(100, 200, 32000)) / 16000)
    assert median_pitch(gliding) == pytest.approx(150, rel=0.05)
    assert median_pitch(np.zeros(16000)) is None
    assert median_pitch(np.random.default_rng(0).normal(size=16000)) is None
    assert median_pitch(np.ones(100)) is None  # shorter than one frame
    assert pitch_closer_to_target(105.0, 100.0, 200.0) is True
    assert pitch_closer_to_target(190.0, 100.0, 200.0) is False
    assert pitch_closer_to_target(150.0, 100.0, 105.0) is None  # the voices' pitches are within 10%
    assert pitch_closer_to_target(None, 100.0, 200.0) is False  # no pitch: it did not take on the target's
    assert pitch_closer_to_target(150.0, None, 200.0) is None


def test_prepare_data_and_eval_commands(tmp_path, capsys):
    from datasets import load_from_disk

    data = write_jsonl(tmp_path / "rows.jsonl", [*fixture_rows(), {"task": "stt", "audio": "nope.wav", "text": "x"}])
    output = tmp_path / "prepared"
    code = main(["prepare-data", str(ORIGINAL_CHECKPOINT), str(data), str(output), "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    assert "skipped 1: missing audio file" in capsys.readouterr().out
    prepared = load_from_disk(str(output))
    assert prepared.column_names == ["task", "input_ids", "labels"] and len(prepared) == 3
    nothing = write_jsonl(tmp_path / "bad.jsonl", [{"task": "stt", "audio": "nope.wav", "text": "x"}])
    assert main(["prepare-data", str(ORIGINAL_CHECKPOINT), str(nothing), str(tmp_path / "p2")]) == 1
    assert "no row could be prepared" in capsys.readouterr().err

    report_path = tmp_path / "asr.json"
    args = ["eval", str(ORIGINAL_CHECKPOINT), str(data), "--task", "asr", "--output", str(report_path)]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    report = json.loads(report_path.read_text())
    # Every row with audio and a transcript is an ASR item: the stt row and the tts-a row; the others are counted.
    assert report["num_items"] == 2
    assert report["skipped"] == {"stt": {"missing audio file": 1}, "vc": {"empty text": 1}}
    assert set(report["items"][0]) >= {"reference", "prediction", "cer", "wer"}
    assert report_path.with_suffix(".png").is_file()


def test_bad_jsonl_gets_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"task": "stt", "audio": "a.wav"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_jsonl_dataset(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no such data file"):
        load_jsonl_dataset(tmp_path / "none.jsonl")


def test_report_counts_by_task_and_reason():
    report = PreparationReport.from_columns(["asr", "asr", "tts"], ["", "missing audio file", ""])
    assert report.to_dict() == {
        "kept": {"asr": 1, "tts": 1},
        "skipped": {"asr": {"missing audio file": 1}},
        "num_kept": 2,
        "num_skipped": 1,
    }
    assert "asr: kept 1" in str(report) and "skipped 1: missing audio file" in str(report)


def test_semantic_input_noise_changes_only_semantic_targets_in_the_inputs(converted):
    from gpa_hf import GpaConfig

    layout = GpaConfig.from_pretrained(converted).layout
    semantic = [layout.semantic_offset + code for code in (0, 5, layout.semantic_size - 1)]
    prompt = [layout.start_global, layout.global_offset + 3, layout.start_semantic, semantic[0]]
    input_ids = torch.tensor([prompt + semantic + [7, layout.end_semantic, layout.stop]])
    labels = torch.tensor([[-100] * len(prompt) + semantic + [7, layout.end_semantic, layout.stop]])
    assert torch.equal(add_semantic_input_noise(input_ids, labels, layout, 0.0), input_ids)
    noisy = add_semantic_input_noise(input_ids, labels, layout, 1.0)
    targets = torch.zeros_like(input_ids, dtype=torch.bool)
    targets[0, len(prompt) : len(prompt) + 3] = True
    assert torch.all(noisy[targets] != input_ids[targets])  # every semantic target changed...
    assert torch.all(layout.block_mask(noisy[targets], "semantic"))  # ...into another semantic token
    assert torch.equal(noisy[~targets], input_ids[~targets])  # the prompt's semantic token and text never change
    half = add_semantic_input_noise(input_ids.repeat(2000, 1), labels.repeat(2000, 1), layout, 0.5)
    changed = (half != input_ids)[:, targets[0]].float().mean()
    assert 0.45 < changed < 0.55
    with pytest.raises(ValueError, match="probability"):
        add_semantic_input_noise(input_ids, labels, layout, 1.5)


def test_trainer_adds_semantic_input_noise_only_while_training(gpa, tmp_path, monkeypatch):
    from gpa_hf import training_gpa

    model, processor = gpa
    dataset = load_jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", fixture_rows()))
    prepared, _ = prepare_dataset(dataset, model, processor, cache_dir=tmp_path / "cache")
    seen = []
    original = training_gpa.add_semantic_input_noise

    def recording(input_ids, labels, layout, probability):
        noisy = original(input_ids, labels, layout, probability)
        seen.append(int((noisy != input_ids).sum()))
        return noisy

    monkeypatch.setattr(training_gpa, "add_semantic_input_noise", recording)
    trainer = training_gpa.build_trainer(
        model,
        processor,
        prepared,
        str(tmp_path / "out"),
        eval_fraction=0.3,
        semantic_input_noise=0.5,
        max_steps=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert len(seen) == 2 and sum(seen) > 0
    trainer.evaluate()
    assert len(seen) == 2  # evaluation sees clean sequences
    model.load_state_dict(state)
    model.eval()


@pytest.fixture(scope="module")
def gpa_tiny_recipe():
    """The gpa-tiny training script as a module (it lives in examples/, outside the package)."""
    sys.path.insert(0, str(EXAMPLES / "gpa_tiny"))
    import train_gpa_tiny

    return train_gpa_tiny


def test_gpa_tiny_recipe_trains_tts_on_voice_conversion_targets(gpa_tiny_recipe, tmp_path):
    rows = [
        {"task": "stt", "audio": "wav/a.wav", "text": "one two"},
        {"task": "vc", "audio": "wav/a.wav", "vc_audio": "wav/vc_a.wav", "ref_audio": "wav/b.wav"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    written = [
        json.loads(line) for line in gpa_tiny_recipe.with_tts_rows_for_vc_targets(train).read_text().splitlines()
    ]
    tts = {"task": "tts-a", "audio": "wav/vc_a.wav", "text": "one two", "ref_audio": "wav/b.wav"}
    assert written == [*rows, tts]


@pytest.mark.parametrize("token_rate", [50, 25])
def test_gpa_tiny_recipe_codec_makes_one_token_per_hop(gpa_tiny_recipe, token_rate):
    from gpa_hf import BiCodecFeatureExtractor, BiCodecModel

    torch.manual_seed(0)
    codec = BiCodecModel(gpa_tiny_recipe.bicodec_config(token_rate)).eval()
    hop = codec.config.hop_length
    assert hop == 16000 // token_rate
    features = BiCodecFeatureExtractor(hop_length=hop, reference_length=codec.config.reference_length)
    clips = [torch.randn(n).numpy() * 0.1 for n in (hop + hop // 4, 7 * hop + hop // 4 + 5, 16000)]
    with torch.no_grad():
        encoded = codec.encode(**features(clips, sampling_rate=16000))
        counts = [(clip.shape[0] - features.min_samples) // hop + 1 for clip in clips]
        assert encoded.semantic_lengths.tolist() == counts == [1, 7, token_rate - 1]
        decoded = codec.decode(encoded.semantic_codes, encoded.global_codes, encoded.semantic_lengths)
    assert decoded.audio_values.shape[-1] == max(counts) * hop
    assert decoded.audio_lengths.tolist() == [count * hop for count in counts]


def test_codec_config_rejects_a_semantic_encoder_of_another_hop(gpa_tiny_recipe):
    from gpa_hf import BiCodecConfig

    settings = {
        **gpa_tiny_recipe.bicodec_config(50).to_dict(),
        "upsampling_rates": [8, 5, 4, 4],
        "decoder_kernel_sizes": [16, 11, 8, 8],
    }
    with pytest.raises(ValueError, match="step 320 samples over a 400-sample receptive field; hop_length=640 needs"):
        BiCodecConfig(**{**settings, "hop_length": 640})


def test_gpa_tiny_recipe_adds_a_harmonic_synthesizer_without_changing_a_token(gpa_tiny_recipe, capsys):
    """Stage 4 on gpa-tiny's codec as stages 2-3 leave it (no synthesiser): the tokenizing paths and the LM keep
    their weights, and the codec's tokens of a clip are the same."""
    from gpa_hf import DEFAULT_MODEL, BiCodecModel, GpaForConditionalGeneration, GpaProcessor

    model = GpaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    config = copy.deepcopy(model.config.bicodec_config)
    config.harmonic_count = config.magnitude_n_fft = 0
    plain = BiCodecModel(config).eval()
    later_stages = ("harmonic_synthesizer.", "pitch_predictor.", "magnitude_refiner.")
    plain.load_state_dict({k: v for k, v in model.bicodec.state_dict().items() if not k.startswith(later_stages)})
    heldout = FIXTURES / "gpa_tiny_heldout"
    rows = [{**row, "speaker": "one"} for row in json.loads((heldout / "clips.json").read_text())]
    codec = gpa_tiny_recipe.train_harmonic_synthesizer(plain, rows, heldout, steps=2, batch_size=2, seed=0)
    assert codec.config.harmonic_count == gpa_tiny_recipe.HARMONIC_COUNT and "[harmonic synthesizer]" in (
        capsys.readouterr().out
    )
    before, after = plain.state_dict(), codec.state_dict()
    frozen = [k for k in before if not k.startswith(("prenet.", "decoder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    features = GpaProcessor.from_pretrained(DEFAULT_MODEL).feature_extractor.bicodec
    inputs = features([str(heldout / rows[0]["audio"])], sampling_rate=16000)
    with torch.no_grad():
        tokens = plain.encode(**inputs)
        again = codec.encode(**inputs)
        audio = codec.decode(tokens.semantic_codes, tokens.global_codes).audio_values
    assert torch.equal(tokens.semantic_codes, again.semantic_codes)
    assert torch.equal(tokens.global_codes, again.global_codes)
    assert audio.abs().max() > 0
    assembled = gpa_tiny_recipe.with_codec(model, codec)
    lm = {k: v for k, v in model.state_dict().items() if not k.startswith("bicodec.")}
    assembled_state = assembled.state_dict()
    assert all(torch.equal(v, assembled_state[k]) for k, v in lm.items())
    assert assembled.config.bicodec_config.harmonic_count == gpa_tiny_recipe.HARMONIC_COUNT


def test_gpa_tiny_recipe_adds_a_magnitude_refiner_and_changes_nothing_else(gpa_tiny_recipe, capsys):
    """The magnitude refiner's stage on gpa-tiny's codec without its refiner: every other weight stays, so tokens,
    wave generator and LM stay valid, and the refined decode is as long as the wave generator's and differs from it."""
    from gpa_hf import DEFAULT_MODEL, BiCodecModel, GpaForConditionalGeneration, GpaProcessor

    model = GpaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    config = copy.deepcopy(model.config.bicodec_config)
    config.magnitude_n_fft = 0
    plain = BiCodecModel(config).eval()
    plain.load_state_dict({k: v for k, v in model.bicodec.state_dict().items() if not k.startswith("magnitude_")})
    heldout = FIXTURES / "gpa_tiny_heldout"
    rows = [
        {**row, "speaker": "one" if i % 2 else "two"}
        for i, row in enumerate(json.loads((heldout / "clips.json").read_text()))
    ]
    codec = gpa_tiny_recipe.train_magnitude_refiner(plain, rows, heldout, steps=2, seed=0, batch_size=2)
    assert codec.config.magnitude_n_fft == gpa_tiny_recipe.MAGNITUDE_N_FFT
    assert "[magnitude refiner] step 2/2" in capsys.readouterr().out
    before, after = plain.state_dict(), codec.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    features = GpaProcessor.from_pretrained(DEFAULT_MODEL).feature_extractor.bicodec
    inputs = features([str(heldout / rows[0]["audio"])], sampling_rate=16000)
    with torch.no_grad():
        tokens = plain.encode(**inputs)
        unrefined = plain.decode(tokens.semantic_codes, tokens.global_codes).audio_values
        refined = codec.decode(tokens.semantic_codes, tokens.global_codes).audio_values
    assert torch.equal(tokens.semantic_codes, codec.encode(**inputs).semantic_codes)
    assert refined.shape == unrefined.shape and (refined - unrefined).abs().max() > 0


def test_speaker_judge_trains_checks_unheard_voices_and_serves_eval(tmp_path, monkeypatch, capsys):
    """The independent judge's script on a small corpus (ten voices: one kept out of training), then `gpa-hf eval
    --speaker-model` scoring voice conversion with it instead of the model's own speaker encoder."""
    sys.path.insert(0, str(EXAMPLES / "gpa_tiny"))
    import train_speaker_judge

    from gpa_hf.audio_utils import load_audio, write_wav
    from gpa_hf.evaluation_gpa import TransformersSpeakerEmbedder, cosine_similarity

    rng = np.random.default_rng(0)
    (tmp_path / "wav").mkdir()
    rows = []
    for voice in range(10):  # a voice = a pitch; two clips each
        for clip in range(2):
            name = f"wav/v{voice}_{clip}.wav"
            time_s = np.arange(rng.integers(8000, 40000)) / 16000
            write_wav(tmp_path / name, 0.3 * np.sin(2 * np.pi * (100 + 20 * voice) * time_s).astype(np.float32))
            rows.append({"task": "stt", "audio": name, "text": "one", "speaker": f"voice{voice}"})
    # voice0 is the voice kept out (the first of every ten, by name): a conversion row targets it
    rows.append({"task": "vc", "audio": "wav/v5_0.wav", "vc_audio": "wav/v0_1.wav", "ref_audio": "wav/v0_0.wav"})
    write_jsonl(tmp_path / "train.jsonl", [{k: v for k, v in row.items() if k != "speaker"} for row in rows])
    monkeypatch.setattr(sys, "argv", ["train_speaker_judge.py", "--corpus", str(tmp_path)])
    with pytest.raises(ValueError, match="got 20 stt rows, 20 without a speaker"):
        train_speaker_judge.main()
    write_jsonl(tmp_path / "train.jsonl", rows)
    judge = tmp_path / "judge"
    argv = ["train_speaker_judge.py", "--corpus", str(tmp_path), "--output-dir", str(judge), "--steps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--batch-size", "4"])
    assert train_speaker_judge.main() == 0
    assert "18 clips of 9 voices; 1 voices kept out" in capsys.readouterr().out
    check = json.loads((judge / "judge_check.json").read_text())
    assert check["unheard_voices"] == ["voice0"] and check["pairs"] == 1
    embed = TransformersSpeakerEmbedder(str(judge))
    rendition, target, source = (embed([load_audio(tmp_path / f"wav/{n}.wav")]) for n in ("v0_1", "v0_0", "v5_0"))
    closer = bool(cosine_similarity(rendition, target) > cosine_similarity(rendition, source))
    assert check["closer_to_target_rate"] == float(closer)

    data = write_jsonl(
        tmp_path / "vc.jsonl", [{"task": "vc", "audio": str(AUDIO / "000.wav"), "ref_audio": str(AUDIO / "astro.wav")}]
    )
    report_path, audio_dir = tmp_path / "vc_report.json", tmp_path / "outputs"
    args = ["eval", str(ORIGINAL_CHECKPOINT), str(data), "--task", "vc", "--speaker-model", str(judge)]
    assert main([*args, "--max-new-tokens", "20", "--output", str(report_path), "--audio-dir", str(audio_dir)]) == 0
    item = json.loads(report_path.read_text())["items"][0]
    output = embed([load_audio(audio_dir / "00000.wav")])
    expected = cosine_similarity(output, embed([load_audio(AUDIO / "astro.wav")])).item()
    assert item["similarity_to_target"] == pytest.approx(expected, abs=1e-4)  # the judge's, not BiCodec's


def fake_espeak(monkeypatch, corpus) -> None:
    """An espeak-ng stand-in for `corpus`: a sine at a pitch of the speaker's, as long as the text."""

    def synthesize(binary, speaker, text, speed, path) -> None:
        from gpa_hf.audio_utils import write_wav

        hertz = 80 + 2 * speaker.pitch + 15 * corpus.VARIANTS.index(speaker.variant)
        time_s = np.arange(int(16000 * (0.4 + 0.03 * len(text)))) / 16000
        write_wav(path, 0.3 * np.sin(2 * np.pi * hertz * time_s).astype(np.float32))

    monkeypatch.setattr(corpus, "synthesize", synthesize)
    monkeypatch.setattr(corpus, "require_espeak", lambda: "espeak-ng")


def test_corpus_lists_every_heldout_clip_with_its_speaker_and_text(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES / "gpa_tiny"))
    import corpus

    fake_espeak(monkeypatch, corpus)
    files = corpus.build_corpus(tmp_path, train_utterances=10, heldout_utterances=8)
    clips = {row["audio"]: row for row in map(json.loads, files["heldout_clips"].read_text().splitlines())}
    assert len(clips) == 16 and all((tmp_path / name).is_file() for name in clips)
    for row in clips.values():
        assert corpus.Speaker.from_name(row["speaker"]).name == row["speaker"]
        assert 130 <= row["speed"] <= 190
    for row in map(json.loads, files["heldout_asr"].read_text().splitlines()):
        assert clips[row["audio"]]["text"] == row["text"]
    for row in map(json.loads, files["heldout_vc"].read_text().splitlines()):
        assert clips[row["audio"]]["speaker"] != clips[row["ref_audio"]]["speaker"]
    assert corpus.Speaker.from_name("en-gb-scotland+f2-p35") == corpus.Speaker("en-gb-scotland", "f2", 35)
    with pytest.raises(ValueError, match="not a corpus speaker name: 'en-us'"):
        corpus.Speaker.from_name("en-us")


def test_vc_bounds_scores_four_renditions_against_clips_and_voices(tmp_path, monkeypatch, capsys):
    """`vc_bounds.py` on a three-voice corpus: its espeak-ng renditions speak the source text in the target voice,
    and their scores by clips and by voices equal a recomputation with the model's speaker encoder."""
    sys.path.insert(0, str(EXAMPLES / "gpa_tiny"))
    import corpus
    import vc_bounds

    from gpa_hf import DEFAULT_MODEL, GpaForConditionalGeneration, GpaProcessor
    from gpa_hf.audio_utils import load_audio
    from gpa_hf.evaluation_gpa import BiCodecSpeakerEmbedder, cosine_similarity

    fake_espeak(monkeypatch, corpus)
    speakers = ["en-us+m1-p35", "en-gb+f2-p65", "en-029+m3-p50"]
    texts = ["one two", "three", "four five six", "seven", "eight nine", "zero one"]
    (tmp_path / "wav").mkdir()
    clips = []
    for index, text in enumerate(texts):  # clip i is spoken by voice i % 3
        row = {"audio": f"wav/heldout_{index:05d}.wav", "text": text, "speaker": speakers[index % 3], "speed": 160}
        corpus.synthesize("espeak-ng", corpus.Speaker.from_name(row["speaker"]), text, 160, tmp_path / row["audio"])
        clips.append(row)
    pairs = [{"task": "vc", "audio": clips[i]["audio"], "ref_audio": clips[(i + 1) % 3]["audio"]} for i in range(3)]
    write_jsonl(tmp_path / "heldout_vc.jsonl", pairs)
    argv = ["vc_bounds.py", "--corpus", str(tmp_path), "--max-new-tokens", "20", "--output", str(tmp_path / "b.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError, match=r"heldout_clips\.jsonl: no such file"):
        vc_bounds.main()
    write_jsonl(tmp_path / "heldout_clips.jsonl", clips)
    assert vc_bounds.main() == 0
    results = json.loads((tmp_path / "b.json").read_text())["results"]["own speaker encoder"]
    assert list(results) == list(vc_bounds.RENDITIONS)
    assert "3 held-out pairs" in capsys.readouterr().out

    model = GpaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    embed = BiCodecSpeakerEmbedder(model, GpaProcessor.from_pretrained(DEFAULT_MODEL))
    clip = {row["audio"]: embed([load_audio(tmp_path / row["audio"])])[0] for row in clips}

    def voice(speaker: str, left_out: str) -> torch.Tensor:
        others = [row["audio"] for row in clips if row["speaker"] == speaker and row["audio"] != left_out]
        return torch.stack([torch.nn.functional.normalize(clip[name], dim=-1) for name in others]).mean(0)

    closer_by_clip, closer_by_voice = [], []
    for index, pair in enumerate(pairs):
        rendition = load_audio(tmp_path / "vc_bounds" / Path(pair["audio"]).name)
        target = clips[(index + 1) % 3]
        expected = tmp_path / "expected.wav"  # the source text in the target voice
        corpus.synthesize("espeak-ng", corpus.Speaker.from_name(target["speaker"]), texts[index], 160, expected)
        np.testing.assert_array_equal(rendition, load_audio(expected))
        output = embed([rendition])[0]
        closer_by_clip.append(
            bool(cosine_similarity(output, clip[pair["ref_audio"]]) > cosine_similarity(output, clip[pair["audio"]]))
        )
        to_target = cosine_similarity(output, voice(target["speaker"], pair["audio"]))
        to_source = cosine_similarity(output, voice(clips[index]["speaker"], pair["audio"]))
        closer_by_voice.append(bool(to_target > to_source))
    assert results["espeak-ng clip"]["closer_to_target_clip_rate"] == pytest.approx(np.mean(closer_by_clip))
    assert results["espeak-ng clip"]["closer_to_target_voice_rate"] == pytest.approx(np.mean(closer_by_voice))


def test_gpa_tiny_recipe_runs_end_to_end_and_resumes(gpa_tiny_recipe, tmp_path, monkeypatch, capsys, two_threads):
    """The whole recipe at a toy size (a stand-in for espeak-ng): corpus, both audio tokenizers, two LM cycles, the
    harmonic synthesiser and the held-out evaluation; then a run resumed at the second LM cycle retrains the LM alone.
    Guards the recipe, which takes two hours at its real size, against changes in the package it is built on."""
    import corpus

    from gpa_hf import GpaForConditionalGeneration, GpaProcessor

    fake_espeak(monkeypatch, corpus)
    work, output = tmp_path / "work", tmp_path / "model"
    toy = ["--utterances", "16", "--heldout", "4", "--codec-steps", "2", "--codec-batch-size", "4"]
    toy += ["--harmonic-steps", "2", "--magnitude-steps", "2", "--lm-hidden-size", "32", "--lm-layers", "1"]
    toy += ["--lm-epochs", "1"]
    toy += ["--lm-cycles", "1", "--recorded-asr-cycles", "1", "--lm-micro-batches", "2"]
    toy += ["--work-dir", str(work), "--output-dir", str(output)]
    monkeypatch.setattr(sys, "argv", ["train_gpa_tiny.py", *toy])
    assert gpa_tiny_recipe.main() == 0
    printed = capsys.readouterr().out
    stages = [printed.index(f"== {stage}/5") for stage in range(1, 6)]
    assert stages == sorted(stages)
    assert "LM training cycle 2/2 (with recorded-sounding ASR clips)" in printed
    metrics = json.loads((output / "training_report.json").read_text())["metrics"]
    assert {"cer", "wer"} <= metrics["asr"].keys() and "cer" in metrics["tts"]
    assert 0 <= metrics["vc"]["closer_to_target_rate"] <= 1
    model = GpaForConditionalGeneration.from_pretrained(output)
    processor = GpaProcessor.from_pretrained(output)
    assert model.config.bicodec_config.harmonic_count == gpa_tiny_recipe.HARMONIC_COUNT
    assert model.config.bicodec_config.magnitude_n_fft == gpa_tiny_recipe.MAGNITUDE_N_FFT
    assert processor.max_source_seconds > 0 and processor.default_voice is not None

    monkeypatch.setattr(sys, "argv", ["train_gpa_tiny.py", *toy, "--first-cycle", "2"])
    assert gpa_tiny_recipe.main() == 0
    printed = capsys.readouterr().out
    assert "== 2/5" not in printed and "== 4/5" not in printed and "LM training cycle 1/2" not in printed
    resumed = GpaForConditionalGeneration.from_pretrained(output).state_dict()
    before = model.state_dict()
    audio_tokenizers = [name for name in before if name.startswith(("bicodec.", "speech_tokenizer."))]
    assert audio_tokenizers and all(torch.equal(before[name], resumed[name]) for name in audio_tokenizers)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], resumed["model.layers.0.mlp.up_proj.weight"])
