"""GPA model, processor, generation, pipelines and conversion on a tiny GPA converted from the fixture."""

from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, ORIGINAL_CHECKPOINT
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
from transformers.cache_utils import DynamicLayer

import gpa_hf  # noqa: F401  (registers the Auto classes and pipelines)
from gpa_hf import GpaForConditionalGeneration, GpaProcessor, GpaVoice, modeling_gpa
from gpa_hf.audio_utils import load_audio, split_at_pauses
from gpa_hf.convert_gpa_original_to_hf import load_original_gpa
from gpa_hf.generation_gpa import (
    CACHE_GROWTH,
    GpaAppendingCacheLayer,
    GpaDecodingCache,
    allowed_token_mask,
)
from gpa_hf.modeling_gpa import (
    INT8_QCONFIG,
    GpaFusedAttention,
    GpaFusedMLP,
    GpaInt8OutputLayer,
    run_side_by_side_on_cpu,
)
from gpa_hf.processing_gpa import GLM_PLACEHOLDER, SEMANTIC_PLACEHOLDER, join_texts, split_text

TEXT = "Hello world, this is Major Tom speaking."


def prompt_ids(model, processor, **kwargs) -> torch.Tensor:
    inputs = processor(**kwargs)
    return model.fill_audio_tokens(**{k: v for k, v in inputs.items() if k != "attention_mask"})


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("infer_stt", {"task": "asr", "audio": str(AUDIO / "000.wav")}),
        ("infer_tts", {"task": "tts", "text": TEXT, "voice": str(AUDIO / "astro.wav")}),
        ("infer_vc", {"task": "vc", "audio": str(AUDIO / "000.wav"), "voice": str(AUDIO / "astro.wav")}),
    ],
)
def test_prompts_equal_reference_sequences(gpa, expected_sequences, case, kwargs):
    model, processor = gpa
    assert prompt_ids(model, processor, **kwargs)[0].tolist() == expected_sequences["cases"][case]["input_ids"]


def test_side_by_side_jobs_share_the_callers_threads_and_keep_its_grad_mode(two_threads):
    both_running = threading.Barrier(2, timeout=10)  # broken (an error) unless the two jobs run at the same time

    def job() -> tuple:
        both_running.wait()
        return (
            threading.get_ident(),
            torch.get_num_threads(),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
        )

    caller = threading.get_ident()
    with torch.inference_mode():
        seen = run_side_by_side_on_cpu([job, job])
    assert len({ident for ident, *_ in seen} | {caller}) == 3  # two worker threads
    assert [state for _, *state in seen] == [[1, False, True]] * 2
    with torch.no_grad():
        assert [state for _, *state in run_side_by_side_on_cpu([job, job])] == [[1, False, False]] * 2
    assert torch.get_num_threads() == 2 and torch.is_grad_enabled()

    def failing() -> None:
        raise ValueError("bad clip")

    with pytest.raises(ValueError, match="bad clip"):
        run_side_by_side_on_cpu([threading.get_ident, failing])
    torch.set_num_threads(1)  # one thread to share: the jobs run in the caller's thread
    assert run_side_by_side_on_cpu([threading.get_ident, threading.get_ident]) == [caller, caller]


def test_asr_audio_tokenized_side_by_side_equals_each_tokenizer_alone(gpa, two_threads, monkeypatch):
    model, processor = gpa
    assert not model.audio_encoders_run_side_by_side()  # small encoders run one after the other
    monkeypatch.setattr(modeling_gpa, "SIDE_BY_SIDE_MIN_ENCODER_PARAMETERS", 0)
    assert model.audio_encoders_run_side_by_side()
    calls = []
    monkeypatch.setattr(
        modeling_gpa, "run_side_by_side_on_cpu", lambda jobs: calls.append(len(jobs)) or run_side_by_side_on_cpu(jobs)
    )
    inputs = processor(task="asr", audio=[str(AUDIO / "000.wav"), str(AUDIO / "astro.wav")])
    with torch.no_grad():
        ids = model.audio_token_ids(
            source_values=inputs["source_values"],
            source_attention_mask=inputs["source_attention_mask"],
            glm_input_features=inputs["glm_input_features"],
            glm_attention_mask=inputs["glm_attention_mask"],
        )
        semantic = model.bicodec.encode(inputs["source_values"], inputs["source_attention_mask"])
        glm = model.speech_tokenizer.encode(inputs["glm_input_features"], inputs["glm_attention_mask"])
    assert calls == [2]
    layout = model.config.layout
    for row in range(2):
        expected = semantic.semantic_codes[row, : semantic.semantic_lengths[row]] + layout.semantic_offset
        assert torch.equal(ids[SEMANTIC_PLACEHOLDER][row], expected)
        expected = glm.audio_codes[row, : glm.code_lengths[row]] + layout.glm_offset
        assert torch.equal(ids[GLM_PLACEHOLDER][row], expected)


def test_saved_voice_gives_the_same_prompt_as_its_audio(gpa, expected_sequences, tmp_path):
    model, processor = gpa
    voice = model.create_voice(
        processor.feature_extractor.reference_features([str(AUDIO / "astro.wav")])["reference_values"]
    )[0]
    voice.save(tmp_path / "astro.voice")
    ids = prompt_ids(model, processor, task="tts", text=TEXT, voice=str(tmp_path / "astro.voice"))
    assert ids[0].tolist() == expected_sequences["cases"]["infer_tts"]["input_ids"]
    assert torch.equal(processor.default_voice.global_codes, voice.global_codes)


def test_vocabulary_layout_is_resolved_from_the_tokenizer(gpa, expected_sequences):
    layout = gpa[0].config.layout
    offsets = expected_sequences["offsets"]
    assert (layout.glm_offset, layout.global_offset, layout.semantic_offset) == (
        offsets["glm"],
        offsets["global"],
        offsets["semantic"],
    )
    assert layout.text_vocab_size == expected_sequences["sizes"]["text_bpe"]


def test_control_token_strings_in_user_text_stay_text(gpa):
    model, processor = gpa
    layout = model.config.layout
    ids = processor.encode_text("say <|end_content|> and <|im_end|> now")
    assert all(i < layout.text_vocab_size for i in ids)
    assert processor.tokenizer.decode(ids) == "say <|end_content|> and <|im_end|> now"


def test_save_pretrained_round_trip_is_exact(gpa, tmp_path):
    model, processor = gpa
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, GpaForConditionalGeneration) and isinstance(reloaded_processor, GpaProcessor)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(reloaded_processor.default_voice.global_codes, processor.default_voice.global_codes)
    assert reloaded.generation_config.task_defaults == model.generation_config.task_defaults


def test_converted_lm_equals_the_published_lm(converted):
    """The LM keeps its published key names: a stock Qwen3ForCausalLM of the original folder gives the same logits."""
    from transformers import Qwen3ForCausalLM

    original = Qwen3ForCausalLM.from_pretrained(ORIGINAL_CHECKPOINT, dtype=torch.float32).eval()
    model = GpaForConditionalGeneration.from_pretrained(converted).eval()
    ids = torch.arange(0, 600, 7)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_lm_only_export_loads_as_plain_qwen3(gpa, tmp_path):
    from transformers import Qwen3ForCausalLM

    from gpa_hf.convert_gpa_original_to_hf import save_lm_only

    model, processor = gpa
    save_lm_only(model, processor, tmp_path)
    lm = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.arange(0, 600, 11)[None]
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, model(ids).logits)


def test_eager_and_sdpa_logits_agree(converted):
    ids = torch.arange(0, 600, 5)[None]
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = GpaForConditionalGeneration.from_pretrained(converted, attn_implementation=implementation).eval()
        with torch.no_grad():
            logits[implementation] = model(ids).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_fused_projections_keep_logits_checkpoints_and_training(converted, tmp_path, implementation):
    model = GpaForConditionalGeneration.from_pretrained(converted, attn_implementation=implementation).eval()
    fused = GpaForConditionalGeneration.from_pretrained(converted, attn_implementation=implementation).eval()
    fused.fuse_projections()
    assert isinstance(fused.model.layers[0].self_attn, GpaFusedAttention)
    assert isinstance(fused.model.layers[0].mlp, GpaFusedMLP) and not hasattr(fused.model.layers[0].mlp, "up_proj")
    ids = torch.arange(0, 600, 7)[None]
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # The checkpoint keeps the published key names, and both directions load.
    expected = model.state_dict()
    state = fused.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    fused.save_pretrained(tmp_path)
    reloaded = GpaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in expected.items())
    blank = GpaForConditionalGeneration.from_pretrained(converted).fuse_projections()
    torch.nn.init.zeros_(blank.model.layers[0].self_attn.qkv_proj.weight)
    blank.load_state_dict(expected)
    blank_weight, fused_weight = (m.model.layers[0].self_attn.qkv_proj.weight for m in (blank, fused))
    assert torch.equal(blank_weight, fused_weight)
    fused.train()
    fused(input_ids=ids, labels=ids).loss.backward()
    assert fused.model.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0


def test_fused_projections_carry_attention_biases(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted, attention_bias=True).eval()
    attention = model.model.layers[0].self_attn
    for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
        torch.nn.init.normal_(layer.bias)
    ids = torch.arange(0, 600, 7)[None]
    expected = model.state_dict()
    with torch.no_grad():
        logits = model(ids).logits
        model.fuse_projections()
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    fused = model.model.layers[0].self_attn
    assert model.fuse_projections().model.layers[0].self_attn is fused  # a second call changes nothing
    assert fused.qkv_proj.bias.shape == (sum(fused.projection_sizes),)


def test_int8_fused_layers_quantize_as_their_parts(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted).eval()
    parts = GpaForConditionalGeneration.from_pretrained(converted).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts.model.layers = torch.ao.quantization.quantize_dynamic(
            parts.model.layers, {torch.nn.Linear: INT8_QCONFIG}, dtype=torch.qint8
        )
    model.quantize_lm_dynamic_int8()
    assert isinstance(model.model.layers[0].self_attn, GpaFusedAttention)
    ids = torch.arange(0, 600, 7)[None]
    with torch.no_grad():
        assert torch.equal(model.model(ids).last_hidden_state, parts.model(ids).last_hidden_state)
    with pytest.raises(ValueError, match=r"fuse before quantizing\); found q_proj: torch\.ao\.nn\.quantized\.dynamic"):
        parts.fuse_projections()


def test_half_precision_load_gives_a_half_precision_lm_and_float32_codecs(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted, dtype=torch.bfloat16)
    lm = {name: parameter.dtype for name, parameter in model.named_parameters() if name.startswith(("model.", "lm_"))}
    assert "model.layers.0.self_attn.q_proj.weight" in lm and set(lm.values()) == {torch.bfloat16}
    assert {p.dtype for p in model.bicodec.parameters()} == {torch.float32}
    assert {p.dtype for p in model.speech_tokenizer.parameters()} == {torch.float32}
    inputs = GpaProcessor.from_pretrained(converted)(task="tts", text=["Hi", "Hello there"])
    options = {"task": "tts", "do_sample": False, "max_new_tokens": 6, "output_audio": True}
    for static_decoding in (False, True):  # the static loop's output rows are read in the LM's dtype
        output = model.generate(**inputs, static_decoding=static_decoding, **options)
        assert [audio.dtype for audio in output.audio] == [torch.float32] * 2


def test_tts_only_loading_skips_audio_encoders(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted, tasks=["tts"])
    assert model.speech_tokenizer is None and model.bicodec.semantic_model is None


def new_tokens(sequences, prompt_length):
    return [s[prompt_length:] for s in sequences]


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_greedy_batch_equals_each_item_alone(gpa, task):
    model, processor = gpa
    if task == "asr":
        items = [str(AUDIO / "000.wav"), str(AUDIO / "astro.wav")]
        make = lambda batch: processor(task="asr", audio=batch)  # noqa: E731
    else:
        items = [TEXT, "Hi"]
        make = lambda batch: processor(task="tts", text=batch)  # noqa: E731
    batch_inputs = make(items)
    batched = model.generate(**batch_inputs, do_sample=False, max_new_tokens=24)
    stop = model.config.layout.stop
    for index, item in enumerate(items):
        alone_inputs = make([item])
        alone = model.generate(**alone_inputs, do_sample=False, max_new_tokens=24)[
            0, alone_inputs["input_ids"].shape[1] :
        ]
        together = batched[index, batch_inputs["input_ids"].shape[1] :]
        alone, together = (
            alone[alone != processor.tokenizer.pad_token_id],
            together[together != processor.tokenizer.pad_token_id],
        )
        assert torch.equal(alone[: len(together)], together[: len(alone)]), f"{task} item {index}"
        assert stop in together.tolist() or len(together) == 24


@pytest.mark.parametrize("task", ["tts", "vc"])
def test_allowed_rows_output_gives_the_same_tokens_and_scores(gpa, task):
    model, processor = gpa
    kwargs = {"text": [TEXT, "Hi"]} if task == "tts" else {"audio": [str(AUDIO / "000.wav"), str(AUDIO / "astro.wav")]}
    inputs = processor(task=task, **kwargs)
    results = []
    for restrict in (True, False):
        torch.manual_seed(3)
        results.append(
            model.generate(
                **inputs, max_new_tokens=30, restrict_output=restrict, output_scores=True, return_dict_in_generate=True
            )
        )
    fast, full = results
    assert torch.equal(fast.sequences, full.sequences)
    for fast_scores, full_scores in zip(fast.scores, full.scores):
        finite = torch.isfinite(full_scores)
        assert torch.equal(finite, torch.isfinite(fast_scores))
        torch.testing.assert_close(fast_scores[finite], full_scores[finite])
    assert isinstance(model.lm_head, torch.nn.Linear)  # the full output layer is back after generation


@pytest.mark.parametrize("task", ["asr", "tts", "vc"])
def test_constrained_decoding_never_emits_forbidden_tokens(gpa, task):
    model, processor = gpa
    torch.manual_seed(0)
    kwargs = {"tts": {"text": TEXT}, "asr": {"audio": str(AUDIO / "000.wav")}}.get(task)
    kwargs = kwargs or {"audio": str(AUDIO / "000.wav"), "voice": str(AUDIO / "astro.wav")}
    inputs = processor(task=task, **kwargs)
    sequences = model.generate(**inputs, do_sample=True, temperature=5.0, top_k=0, max_new_tokens=40)
    allowed = allowed_token_mask(task, model.config.layout, model.config.vocab_size)
    generated = sequences[:, inputs["input_ids"].shape[1] :]
    generated = generated[generated != processor.tokenizer.pad_token_id]
    assert generated.numel() > 0 and allowed[generated].all()


def test_length_budget_stops_every_row(gpa):
    model, processor = gpa
    inputs = processor(task="tts", text=["Hi", TEXT])
    sequences = model.generate(**inputs, do_sample=True, temperature=5.0, top_k=0)
    text_tokens = [len(processor.encode_text(t)) for t in ["Hi", TEXT]]
    new = sequences[:, inputs["input_ids"].shape[1] :]
    for row, count in enumerate(text_tokens):
        produced = (new[row] != processor.tokenizer.pad_token_id).sum().item()
        assert produced <= 100 + 25 * count + 1  # each row within its own budget, left padding not counted


def test_waveform_length_is_320_per_semantic_token(gpa):
    model, processor = gpa
    inputs = processor(task="tts", text=[TEXT, "Hi"])
    output = model.generate(**inputs, output_audio=True, max_new_tokens=30, do_sample=True, temperature=1.0)
    layout = model.config.layout
    for sequence, audio in zip(output.sequences, output.audio):
        new = sequence[inputs["input_ids"].shape[1] :]
        semantic = ((new >= layout.semantic_offset) & (new < layout.semantic_offset + layout.semantic_size)).sum()
        assert audio.shape == (320 * int(semantic),)


def test_decode_audio_gives_each_request_its_audio_alone(gpa):
    """One codec call for requests of different lengths: each waveform equals its tokens decoded alone."""
    model, processor = gpa
    layout = model.config.layout
    inputs = processor(task="tts", text=["Hi"] * 4)
    prompt = inputs["input_ids"]
    generator = torch.Generator().manual_seed(0)
    lengths = [150, 90, 0, 60]  # the empty request is left out of the call
    rows = []
    for length in lengths:
        codes = torch.randint(0, layout.semantic_size, (length,), generator=generator) + layout.semantic_offset
        stop = torch.full((max(lengths) - length + 1,), layout.stop)
        rows.append(torch.cat([codes, stop]))
    sequences = torch.cat([prompt, torch.stack(rows)], dim=1)
    calls = []
    handle = model.bicodec.decoder.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    try:
        with pytest.warns(UserWarning, match=r"requests \[2\] produced no audio tokens") as caught:
            waveforms = model.decode_audio(sequences, prompt.shape[1])
        assert caught[0].filename == __file__  # the caller's line, not a decorator's in torch
    finally:
        handle.remove()
    hop = model.config.bicodec_config.hop_length
    assert calls == [(3, max(lengths) * hop)]
    for waveform, row, voice, length in zip(waveforms, rows, prompt, lengths):
        assert waveform.shape == (length * hop,)
        if length:
            alone = model.synthesize(
                row[None, :length] - layout.semantic_offset,
                layout.block_codes(voice, "global")[None],
                torch.tensor([length]),
            )
            torch.testing.assert_close(waveform, alone[0], atol=1e-5, rtol=0)


def test_caller_sampling_settings_override_task_defaults(gpa):
    model, _ = gpa
    config = model.task_generation_config("tts", None, temperature=0.9, top_k=5)
    assert (config.do_sample, config.temperature, config.top_k, config.repetition_penalty) == (True, 0.9, 5, 1.2)
    greedy = model.task_generation_config("tts", None, do_sample=False)
    assert greedy.do_sample is False and greedy.temperature is None
    assert model.task_generation_config("asr", None).do_sample is False


def test_pipelines_return_documented_structures(converted):
    short = {"max_new_tokens": 12}
    tts = pipeline("text-to-speech", model=str(converted))
    speech = tts("Hello world. How are you?", generate_kwargs=short)
    assert set(speech) == {"audio", "sampling_rate"} and speech["sampling_rate"] == 16000
    assert speech["audio"].dtype == np.float32 and speech["audio"].ndim == 1
    batch = tts(["Hi", "Hello"], batch_size=2, voice=str(AUDIO / "000.wav"), generate_kwargs=short)
    assert len(batch) == 2 and all(set(b) == {"audio", "sampling_rate"} for b in batch)
    asr = pipeline("automatic-speech-recognition", model=str(converted))
    assert set(asr(str(AUDIO / "000.wav"), generate_kwargs=short)) == {"text"}
    assert [set(r) for r in asr([str(AUDIO / "000.wav")] * 2, batch_size=2, generate_kwargs=short)] == [{"text"}] * 2
    vc = pipeline("voice-conversion", model=str(converted))
    converted_speech = vc(str(AUDIO / "000.wav"), voice=str(AUDIO / "astro.wav"), generate_kwargs=short)
    assert converted_speech["sampling_rate"] == 16000 and converted_speech["audio"].ndim == 1
    both = vc([str(AUDIO / "000.wav")] * 2, voice=str(AUDIO / "astro.wav"), batch_size=2, generate_kwargs=short)
    assert len(both) == 2


def test_pipelines_take_a_gpa_model_object_and_still_require_stock_components(gpa):
    """A model in memory (after training, say) needs no tokenizer or feature extractor: its processor is found by the
    model's name, or passed. Other models still need theirs, as the stock pipelines require."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    model, processor = gpa
    short = {"max_new_tokens": 12}
    speech = pipeline("text-to-speech", model=model)("Hello world.", generate_kwargs=short)
    assert speech["sampling_rate"] == 16000 and speech["audio"].size > 0
    asr = pipeline("automatic-speech-recognition", model=model, processor=processor)
    assert set(asr(str(AUDIO / "000.wav"), generate_kwargs=short)) == {"text"}
    tiny_ctc = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8,),
        conv_stride=(5,), conv_kernel=(10,), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs tokenizer=, feature_extractor= for a Wav2Vec2ForCTC"):
        pipeline("automatic-speech-recognition", model=Wav2Vec2ForCTC(tiny_ctc))


def test_split_text_cuts_at_sentences_then_clauses_then_words():
    text = "First sentence. Second one! Third? " * 20
    pieces = split_text(text, max_characters=60)
    assert all(len(p) <= 60 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert all(p.endswith((".", "!", "?")) for p in pieces)  # whole sentences while they fit
    assert split_text("你好。今天天气很好。", 4) == ["你好。", "今天天气", "很好。"]
    long_sentence = "one two three, four five six seven eight nine ten eleven twelve"
    assert split_text(long_sentence, 20) == [
        "one two three,",
        "four five six seven",
        "eight nine ten",
        "eleven twelve",
    ]
    assert split_text("a Donaudampfschifffahrt b", 5) == ["a", "Donaudampfschifffahrt", "b"]  # a word stays whole
    assert join_texts(["hello", "world", "你好", "世界"]) == "hello world 你好世界"


def test_split_at_pauses_cuts_in_the_pauses_and_keeps_every_sample():
    rate = 16000
    noise = np.random.default_rng(0)
    parts, pauses, position = [np.zeros(rate // 2)], [], rate // 2  # silence before the first sound stays attached
    for seconds in (0.9, 1.4, 0.6, 1.2, 1.0):
        samples = int(seconds * rate)
        parts.append(
            0.3 * np.sin(2 * np.pi * 220 * np.arange(samples) / rate) * (1 + 0.1 * noise.standard_normal(samples))
        )
        parts.append(np.zeros(int(0.4 * rate)))
        pauses.append((position + samples, position + samples + parts[-1].size))
        position = pauses[-1][1]
    recording = np.concatenate(parts)
    spans = split_at_pauses(recording, rate, max_seconds=2.0)
    assert spans[0][0] == 0 and spans[-1][1] == recording.size
    assert all(previous.stop == following.start for previous, following in itertools.pairwise(spans))
    assert len(spans) == 5  # one utterance each
    assert all(any(first < span.stop < last for first, last in pauses) for span in spans[:-1])
    assert not any(span.silent for span in spans)
    assert split_at_pauses(recording[:rate], rate, max_seconds=2.0) == [(0, rate, False)]
    # Silence after the last sound stays attached; cutting inside it leaves spans of silence alone, marked silent
    trailing = np.concatenate([recording[: int(1.2 * rate)], np.zeros(5 * rate)])
    spans = split_at_pauses(trailing, rate, max_seconds=2.0)
    assert len(spans) >= 3 and [span.silent for span in spans] == [False] + [True] * (len(spans) - 1)

    # No pause: cuts at the quietest moments (a sound whose loudness swells and fades twice a second), within the limit
    time = np.arange(10 * rate) / rate
    hum = np.sin(2 * np.pi * 220 * time) * (1.05 + np.sin(2 * np.pi * 2 * time))
    spans = split_at_pauses(hum, rate, max_seconds=3.0)
    lengths = [stop - start for start, stop, _ in spans]
    assert sum(lengths) == hum.size and max(lengths) <= 3 * rate and lengths[-1] >= 0.75 * rate
    envelope = 1.05 + np.sin(2 * np.pi * 2 * time)
    assert all(envelope[stop] < 0.2 for _, stop, _ in spans[:-1])
    with pytest.raises(ValueError, match="max_seconds must be positive"):
        split_at_pauses(hum, rate, 0)


def test_long_requests_are_refused_by_the_processor_and_cut_by_the_pipelines(gpa):
    """One prompt takes what the model was trained on; the pipelines cut longer input and join the outputs."""
    model, processor = gpa
    speech, rate = sf.read(AUDIO / "astro.wav", dtype="float32")
    recording = np.concatenate([speech, np.zeros(rate // 2, dtype=np.float32)] * 4)  # 18.7 s
    with pytest.raises(ValueError, match=r"audio 0 is 18\.7 s long.*max_source_seconds"):
        processor(task="asr", audio=recording, sampling_rate=rate)
    with pytest.raises(ValueError, match=r"text 0 has 259 characters.*max_text_characters"):
        processor(task="tts", text="Hello there, how are you? " * 10)

    pieces = processor.split("asr", audio=[recording, str(AUDIO / "000.wav")], sampling_rate=rate)
    cut = len(pieces) - 1  # the pieces of the recording; the short clip stays whole
    assert cut >= 2 and pieces.owners == [0] * cut + [1]
    assert all(piece.size <= 14 * 16000 for piece in pieces.inputs)
    np.testing.assert_array_equal(np.concatenate(pieces.inputs[:cut]), load_audio(recording, rate))
    asr = pipeline("automatic-speech-recognition", model=model, processor=processor)
    short = {"max_new_tokens": 4}
    texts = asr([{"raw": recording, "sampling_rate": rate}, str(AUDIO / "000.wav")], generate_kwargs=short)
    piece_by_piece = [
        asr({"array": piece, "sampling_rate": 16000}, generate_kwargs=short)["text"] for piece in pieces.inputs
    ]
    assert [t["text"] for t in texts] == [join_texts(piece_by_piece[:cut]), piece_by_piece[cut]]

    # A piece of silence is not converted: it stays silence
    quiet_end = np.concatenate([speech, np.zeros(20 * rate, dtype=np.float32)])
    pieces = processor.split("vc", audio=quiet_end, sampling_rate=rate, voice=str(AUDIO / "000.wav"))
    silence = sum(piece.size for piece, silent in zip(pieces.inputs, pieces.silent) if silent)
    assert silence > 0 and len(pieces) == len(pieces.inputs) - sum(pieces.silent)
    vc = pipeline("voice-conversion", model=model, processor=processor)
    converted = vc({"array": quiet_end, "sampling_rate": rate}, voice=str(AUDIO / "000.wav"), generate_kwargs=short)
    assert converted["audio"].size > silence and not converted["audio"][-silence:].any()

    text = "Hello there, how are you? " * 10
    assert len(processor.split("tts", text=text)) == 2
    three_tokens = {"max_new_tokens": 3, "min_new_tokens": 3}
    speech = pipeline("text-to-speech", model=model, processor=processor)(text, generate_kwargs=three_tokens)
    assert speech["audio"].size == 2 * 3 * model.config.bicodec_config.hop_length  # two pieces of 3 tokens


def test_bad_input_gets_clear_errors(gpa, converted, tmp_path):
    model, processor = gpa
    with pytest.raises(ValueError, match="non-empty string"):
        processor(task="tts", text="   ")
    with pytest.raises(ValueError, match="no such file"):
        processor(task="asr", audio=str(tmp_path / "missing.wav"))
    bad_voice = tmp_path / "bad.voice"
    bad_voice.write_bytes(b"not a voice")
    with pytest.raises(ValueError, match="not a gpa-hf voice file"):
        processor(task="tts", text="Hi", voice=str(bad_voice))
    wrong = tmp_path / "wrong.voice"
    from safetensors.torch import save_file

    save_file({"codes": torch.zeros(32, dtype=torch.long)}, wrong)
    with pytest.raises(ValueError, match="not a gpa-hf voice file"):
        GpaVoice.load(wrong)
    with pytest.raises(ValueError, match="unknown task"):
        processor(task="translate", text="Hi")
    with pytest.raises(ValueError, match="takes no text"):
        processor(task="asr", audio=str(AUDIO / "000.wav"), text="Hi")
    with pytest.raises(ValueError, match="unknown arguments"):
        pipeline("text-to-speech", model=str(converted))("Hi", speed=2)
    with pytest.raises(ValueError, match="output_audio=True is for tts and vc"):
        model.generate(**processor(task="asr", audio=str(AUDIO / "000.wav")), output_audio=True)


def test_empty_generation_gives_empty_waveform_and_warning(gpa):
    model, processor = gpa
    stop = model.config.layout.stop

    def stop_at_once(input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, stop] = 0.0
        return forced

    inputs = processor(task="tts", text=["Hi", "Hello"])
    with pytest.warns(UserWarning, match="no audio tokens"):
        output = model.generate(**inputs, output_audio=True, logits_processor=[stop_at_once])
    assert [a.numel() for a in output.audio] == [0, 0]


def test_original_layout_loads_directly():
    model, processor = load_original_gpa(ORIGINAL_CHECKPOINT, tasks=["tts"])
    assert model.bicodec.semantic_model is None and model.speech_tokenizer is None
    assert processor.layout.stop == 402


def test_static_cache_generation_equals_dynamic(gpa):
    model, processor = gpa
    inputs = processor(task="tts", text=[TEXT, "Hi"])
    dynamic = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    static = model.generate(**inputs, do_sample=False, max_new_tokens=12, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("task", ["asr", "tts", "vc"])
def test_appending_cache_generates_what_the_stock_cache_does(gpa, task):
    model, processor = gpa
    clips = [str(AUDIO / "000.wav"), str(AUDIO / "astro.wav")]
    kwargs = {"tts": {"text": [TEXT, "Hi"]}, "asr": {"audio": clips}, "vc": {"audio": clips, "voice": clips[1]}}
    inputs = processor(task=task, **kwargs[task])  # a left-padded batch
    results = []
    for cache_implementation in (None, "dynamic"):
        torch.manual_seed(5)
        results.append(
            model.generate(
                **inputs,
                max_new_tokens=CACHE_GROWTH,  # prompt + new tokens outgrow the first buffer
                cache_implementation=cache_implementation,
                output_scores=True,
                return_dict_in_generate=True,
            )
        )
    appending, stock = results
    assert isinstance(appending.cache, GpaDecodingCache)
    assert not isinstance(stock.cache, GpaDecodingCache)
    assert appending.cache.get_seq_length() > CACHE_GROWTH
    assert torch.equal(appending.sequences, stock.sequences)
    for appending_scores, stock_scores in zip(appending.scores, stock.scores):
        torch.testing.assert_close(appending_scores, stock_scores, rtol=0, atol=0)


def test_appending_cache_layer_follows_crop_and_reorder_like_the_stock_layer():
    torch.manual_seed(0)
    appending, stock = GpaAppendingCacheLayer(), DynamicLayer()

    def step(length: int, batch_size: int = 3) -> None:
        keys, values = torch.randn(batch_size, 2, length, 4), torch.randn(batch_size, 2, length, 4)
        got, expected = appending.update(keys, values), stock.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))

    step(CACHE_GROWTH - 2)
    buffer = appending.key_buffer
    step(1)
    assert appending.key_buffer is buffer  # appended into spare room, nothing copied
    step(5)  # outgrows the buffer
    assert appending.key_buffer.shape[-2] == 2 * CACHE_GROWTH
    for layer in (appending, stock):
        layer.crop(-4)
    step(3)
    assert appending.get_seq_length() == stock.get_seq_length() == CACHE_GROWTH + 3
    order = torch.tensor([2, 0, 0])
    for layer in (appending, stock):
        layer.reorder_cache(order)
    step(1)
    for layer in (appending, stock):
        layer.batch_select_indices(torch.tensor([1, 2]))
    step(2, batch_size=2)
    assert appending.get_seq_length() == CACHE_GROWTH + 6


def test_gradient_checkpointing_training_step(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted, tasks=["tts"])
    model.activation_checkpointing_enable()
    model.train()
    ids = torch.arange(400, 600, 3)[None]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].mlp.up_proj.weight.grad is not None


@pytest.mark.parametrize("static_decoding", [True, False])
@pytest.mark.parametrize("task", ["tts", "vc"])
def test_streamed_chunks_join_to_the_offline_waveform(gpa, task, static_decoding):
    model, processor = gpa
    kwargs = {"text": TEXT} if task == "tts" else {"audio": str(AUDIO / "000.wav")}
    inputs = processor(task=task, voice=str(AUDIO / "astro.wav"), **kwargs)
    offline = model.generate(**inputs, do_sample=False, max_new_tokens=120, output_audio=True).audio[0]
    settings = {"do_sample": False, "max_new_tokens": 120, "static_decoding": static_decoding}
    chunks = list(model.generate_stream(**inputs, **settings, first_chunk_tokens=7, chunk_tokens=25))
    hop = model.config.bicodec_config.hop_length
    assert chunks[0].numel() == 7 * hop and all(c.numel() == 25 * hop for c in chunks[1:-1])
    joined = torch.cat(chunks)
    assert joined.numel() == offline.numel()  # no sample repeated or missing at the boundaries
    snr = 10 * torch.log10(offline.pow(2).sum() / (offline - joined).pow(2).sum())
    assert snr > 30


@pytest.mark.parametrize("static_decoding", [False, True])
def test_stopping_a_stream_early_stops_generation(gpa, static_decoding):
    model, processor = gpa
    inputs = processor(task="tts", text=TEXT, voice=str(AUDIO / "astro.wav"))
    full = model.generate(**inputs, do_sample=False, max_new_tokens=300)
    new_tokens = full.shape[1] - inputs["input_ids"].shape[1]
    threads_before = threading.active_count()
    stream = model.generate_stream(**inputs, do_sample=False, max_new_tokens=300, static_decoding=static_decoding)
    next(stream)
    streamer = stream.gi_frame.f_locals["streamer"]
    # static decoding steps in the caller's thread; `generate` runs in a thread of its own while the stream lasts
    assert threading.active_count() == threads_before + (0 if static_decoding else 1)
    stream.close()  # returns once generation has stopped
    assert threading.active_count() == threads_before
    assert len(streamer.codes) < new_tokens / 2, (len(streamer.codes), new_tokens)


def test_stream_rejects_batches_and_asr(gpa):
    model, processor = gpa
    with pytest.raises(ValueError, match="one prompt"):
        next(model.generate_stream(**processor(task="tts", text=[TEXT, "Hi"])))
    with pytest.raises(ValueError, match="tts and vc"):
        next(model.generate_stream(**processor(task="asr", audio=str(AUDIO / "000.wav"))))


def test_dynamic_int8_lm_keeps_codecs_float32_and_logits_close(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted).eval()
    processor = GpaProcessor.from_pretrained(converted)
    inputs = processor(task="tts", text=TEXT)
    ids = model.fill_audio_tokens(inputs["input_ids"], inputs["audio_input_mask"])
    with torch.no_grad():
        reference = model(ids).logits[0, -1]
        model.quantize_lm_dynamic_int8()
        quantized = model(ids).logits[0, -1]
        hidden = model.model(ids).last_hidden_state[0, -1]
        # TTS rows still come from the float32 weight, which stays tied to the input embeddings.
        allowed = allowed_token_mask("tts", model.config.layout, model.config.vocab_size)
        with model.allowed_rows_output(allowed):
            constrained = model(ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(reference, quantized, dim=0) > 0.99
    assert type(model.model.layers[0].mlp.gate_up_proj) is not torch.nn.Linear
    assert isinstance(model.lm_head, GpaInt8OutputLayer)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    torch.testing.assert_close(constrained[allowed], hidden @ model.lm_head.weight[allowed].T)
    assert model.bicodec.dtype == torch.float32 and model.speech_tokenizer.dtype == torch.float32
    output = model.generate(**inputs, max_new_tokens=5, output_audio=True)
    assert output.audio[0].dtype == torch.float32


def test_dynamic_int8_output_layer_only_where_asr_reads_it(converted):
    model = GpaForConditionalGeneration.from_pretrained(converted, tasks=["tts", "vc"]).eval()
    assert type(model.quantize_lm_dynamic_int8().lm_head) is torch.nn.Linear
