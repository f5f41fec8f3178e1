"""Static decoding (`generate(static_decoding=True)`): the same tokens as `generate`, in one reusable loop."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import FIXTURES
from torch._inductor.utils import run_and_get_code
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import gpa_hf
from gpa_hf import GpaForConditionalGeneration, GpaProcessor
from gpa_hf.generation_gpa import (
    GpaCudaGraphs,
    GpaDecodingCache,
    GpaStaticDecoder,
    GpaStepCache,
    GpaTraceableInt8Linear,
    StaticDecodingSettings,
    allowed_token_mask,
    gumbel_max_sample,
)
from gpa_hf.modeling_gpa import INT8_QCONFIG, GpaInt8OutputLayer

HELDOUT = FIXTURES / "gpa_tiny_heldout"


@pytest.fixture(scope="module")
def tiny():
    """The embedded gpa-tiny: trained, so its outputs stop on their own at different lengths."""
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval()
    return model, GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def clips() -> list[str]:
    return [str(HELDOUT / row["audio"]) for row in json.loads((HELDOUT / "clips.json").read_text())]


def requests(processor, clips: list[str]) -> dict:
    return {
        "tts": processor(task="tts", text=["three one four", "nine", "two two eight five"]),
        "asr": processor(task="asr", audio=clips[:3]),
        "vc": processor(task="vc", audio=clips[:2], voice=clips[2]),
    }


def decoder_case(model, processor, clips: list[str], task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A task's left-padded prompts with their audio codes filled in, their mask, and the task's output rows."""
    inputs = requests(processor, clips)[task]
    input_ids = model.fill_audio_tokens(
        inputs["input_ids"],
        inputs["audio_input_mask"],
        **{name: inputs[name] for name in inputs if name not in ("input_ids", "attention_mask", "audio_input_mask")},
    )
    rows = allowed_token_mask(task, model.config.layout, model.config.vocab_size).nonzero().squeeze(-1)
    return input_ids, inputs["attention_mask"], rows


@pytest.mark.parametrize("task", ["tts", "asr", "vc"])
@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_static_decoding_equals_generate(tiny, clips, task, repetition_penalty):
    model, processor = tiny
    inputs = requests(processor, clips)[task]  # a left-padded batch of prompts of different lengths
    settings = {"do_sample": False, "repetition_penalty": repetition_penalty}
    expected = model.generate(**inputs, task=task, **settings)
    assert torch.equal(model.generate(**inputs, task=task, static_decoding=True, **settings), expected)


def test_static_asr_reads_an_int8_output_layer_as_generate_does(clips):
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval().quantize_lm_dynamic_int8()
    # One prompt: dynamic int8 quantizes each product's input with one scale for the whole batch, so what the two
    # loops compute at padding positions (unused either way) could round a batch's real rows differently.
    inputs = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)(task="asr", audio=clips[0])
    expected = model.generate(**inputs, do_sample=False)
    assert torch.equal(model.generate(**inputs, do_sample=False, static_decoding=True), expected)
    (decoder,) = model.static_decoders.values()
    assert decoder.gather_rows and isinstance(decoder.full_output_layer, GpaInt8OutputLayer)


def test_a_new_output_layer_drops_the_captured_step(tiny, clips):
    model, processor = tiny
    inputs = processor(task="asr", audio=clips[:1])
    model.generate(**inputs, static_decoding=True)
    decoder = next(reversed(model.static_decoders.values()))
    graph_caches = (decoder.step_graph, decoder.prefill_graphs)
    for graphs in graph_caches:
        graphs.graphs["captured"] = object()  # stands for a CUDA graph captured with the current layer
    decoder.refresh_output_rows()
    assert all("captured" in graphs.graphs for graphs in graph_caches)
    full_head = model.lm_head
    model.lm_head = torch.nn.Sequential(full_head)  # another module around the same weight storage
    model.lm_head.weight, model.lm_head.bias = full_head.weight, full_head.bias
    try:
        decoder.refresh_output_rows()
    finally:
        model.lm_head = full_head
    assert not any(graphs.graphs for graphs in graph_caches)


def test_decoder_is_reused_and_reset_between_requests(tiny, clips):
    model, processor = tiny
    model.static_decoders.clear()
    results = []
    for text in (["one two", "seven"], ["eight eight", "three"]):  # same batch size and cache length
        inputs = processor(task="tts", text=text)
        expected = model.generate(**inputs, do_sample=False)
        results.append(torch.equal(model.generate(**inputs, do_sample=False, static_decoding=True), expected))
    assert results == [True, True]
    assert len(model.static_decoders) == 1


def test_result_does_not_depend_on_how_often_the_host_checks(tiny):
    model, processor = tiny
    inputs = processor(task="tts", text=["four four", "six"])
    allowed = allowed_token_mask("tts", model.config.layout, model.config.vocab_size)
    settings = StaticDecodingSettings(False, 1.0, 0, 1.0, 1.0, 0)
    decoder = GpaStaticDecoder(model, allowed.nonzero().squeeze(-1), model.config.layout.stop, 0, 2, 512, settings)
    budgets = torch.tensor([150, 150])
    outputs = [
        decoder.decode(inputs["input_ids"], inputs["attention_mask"], budgets, 151, sync_every=n) for n in (1, 8)
    ]
    assert torch.equal(outputs[0], outputs[1])
    new = outputs[0][:, inputs["input_ids"].shape[1] :]
    assert (new == model.config.layout.stop).any(-1).all()  # every row stopped, and nothing after the last stop
    assert (new[:, -1] == model.config.layout.stop).any()


@pytest.mark.parametrize("task", ["tts", "asr", "vc"])
def test_prompts_padded_to_a_multiple_give_the_same_tokens(tiny, clips, task):
    """CUDA pads prompts to a multiple of 32 tokens (one prefill graph per multiple): the result must not change."""
    model, processor = tiny
    input_ids, attention_mask, rows = decoder_case(model, processor, clips, task)
    assert input_ids.shape[1] % 32 != 0
    settings = StaticDecodingSettings(False, 1.0, 0, 1.0, 1.2, 0)
    budgets = torch.full((input_ids.shape[0],), 60)
    outputs = [
        GpaStaticDecoder(
            model, rows, model.config.layout.stop, 0, input_ids.shape[0], 512, settings, prefill_multiple=multiple
        ).decode(input_ids, attention_mask, budgets, 61)
        for multiple in (1, 32)
    ]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("task", ["tts", "asr", "vc"])
def test_appending_and_static_caches_decode_the_same_tokens(tiny, clips, task):
    """On CPU the decoder appends to a dynamic cache (no mask for an unpadded prompt); CUDA uses a static one."""
    model, processor = tiny
    input_ids, attention_mask, rows = decoder_case(model, processor, clips, task)
    settings = StaticDecodingSettings(False, 1.0, 0, 1.0, 1.2, 0)
    longest = int(attention_mask.sum(-1).argmax())
    unpadded = (input_ids[longest : longest + 1], attention_mask[longest : longest + 1])
    for prompts, mask in ((input_ids, attention_mask), unpadded):
        assert mask.all() != (prompts.shape[0] > 1)  # a left-padded batch, then its longest prompt alone
        budgets = torch.full((prompts.shape[0],), 60)
        decoders = [
            GpaStaticDecoder(
                model, rows, model.config.layout.stop, 0, prompts.shape[0], 512, settings, static_cache=static
            )
            for static in (False, True)
        ]
        assert isinstance(decoders[0].cache, GpaDecodingCache)
        outputs = [decoder.decode(prompts, mask, budgets, 61) for decoder in decoders]
        assert torch.equal(outputs[0], outputs[1])
        assert (outputs[0][:, prompts.shape[1] :] != 0).any()


def test_compiled_cpu_decoding_equals_the_eager_loop(clips):
    """A compiled CPU step (one graph; KV buffers read up to the filled length) gives the eager loop's tokens, for an
    unpadded prompt (no mask) and a padded batch; later requests reuse the compiled code, and a float LM's weights
    changed in place (training) are read as they are, not as they were when compiled."""
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval().fuse_projections()
    processor = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)
    cases = {"tts": processor(task="tts", text=["two two eight five"]), "asr": requests(processor, clips)["asr"]}
    expected = {}
    for task, inputs in cases.items():
        expected[task] = model.generate(**inputs, task=task, do_sample=False, static_decoding=True)
        for _ in range(2):
            result = model.generate(**inputs, task=task, do_sample=False, static_decoding=True, compile_decoding=True)
            assert torch.equal(result, expected[task]), task
    decoder = next(decoder for decoder in model.static_decoders.values() if decoder.compiled_on_cpu)
    assert isinstance(decoder.cache, GpaStepCache)
    compiled = decoder.step_lm.compiled
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.neg_()  # a change the transcripts show (x0.8 does not)
    inputs = cases["asr"]
    changed = model.generate(**inputs, task="asr", do_sample=False, static_decoding=True)
    assert not torch.equal(changed, expected["asr"])
    result = model.generate(**inputs, task="asr", do_sample=False, static_decoding=True, compile_decoding=True)
    assert torch.equal(result, changed)
    assert decoder.step_lm.compiled is compiled


def test_compiled_cpu_decoding_compiles_once_for_every_prompt_and_cache_length():
    """With compiled CPU decoding the prompts' pass is compiled too: the first request compiles two graphs (the
    prompts' pass, their length symbolic, and the step); prompts of other lengths and requests needing a longer KV
    cache compile nothing more, and every request gives the eager loop's tokens."""
    torch.compiler.reset()  # earlier tests' graphs of the same functions count towards dynamo's recompile limit
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval()
    processor = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)
    layout = model.config.layout
    codes = torch.arange(600) % 64
    long_asr = torch.cat(  # 150 GLM and 300 semantic tokens: a longer prompt than the processor makes
        [
            torch.tensor([layout.start_glm]),
            codes[:150] + layout.glm_offset,
            torch.tensor([layout.end_glm, layout.start_semantic]),
            codes[150:450] + layout.semantic_offset,
            torch.tensor([layout.end_semantic, layout.start_content]),
        ]
    )[None]
    cases = [
        ("tts", processor(task="tts", text="four one"), 2),
        ("tts", processor(task="tts", text="nine nine three eight two"), 0),
        ("asr", {"input_ids": long_asr}, 0),
    ]
    graphs = torch._dynamo.utils.counters["stats"]
    for task, inputs, new_graphs in cases:
        expected = model.generate(**inputs, task=task, do_sample=False, static_decoding=True)
        before = graphs["unique_graphs"]
        result = model.generate(**inputs, task=task, do_sample=False, static_decoding=True, compile_decoding=True)
        assert graphs["unique_graphs"] - before == new_graphs, inputs["input_ids"].shape
        assert torch.equal(result, expected), inputs["input_ids"].shape
    cache_lengths = {decoder.max_cache_len for decoder in model.static_decoders.values() if decoder.compiled_on_cpu}
    assert len(cache_lengths) == 2


def test_traceable_int8_layer_compiles_to_onednn_int8_products():
    """The int8 layer of compiled CPU steps: inductor must turn it into oneDNN's int8 product (else a step would
    dequantize every weight), with the values of its eager form and the float layer's within int8 rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        quantized = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear: INT8_QCONFIG}, dtype=torch.qint8
        )[0]
    layer = GpaTraceableInt8Linear(quantized)
    inputs = torch.randn(3, 64)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        compiled, code = run_and_get_code(torch.compile(layer), inputs)
        eager, expected = layer(inputs), linear(inputs)
    assert "onednn.qlinear_pointwise" in "".join(code)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for result in (compiled, quantized(inputs)):
        assert (result - expected).norm() / expected.norm() < 0.02


def test_a_voice_of_the_wrong_size_is_named(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="32 global tokens; got 31"):
        model.synthesize(
            torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 31, dtype=torch.long), torch.tensor([10])
        )


def test_processed_scores_equal_the_transformers_processors(tiny):
    model, _ = tiny
    layout = model.config.layout
    allowed = allowed_token_mask("tts", layout, model.config.vocab_size)
    rows = allowed.nonzero().squeeze(-1)
    settings = StaticDecodingSettings(True, 0.7, 20, 0.9, 1.3, 0)
    decoder = GpaStaticDecoder(model, rows, layout.stop, 0, 2, 256, settings)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, rows.numel(), generator=generator) * 3
    history = rows[torch.randint(0, rows.numel() - 1, (2, 12), generator=generator)]
    decoder.seen.zero_()
    for row, ids in enumerate(history):
        decoder.seen[row] = torch.isin(rows, ids)
    decoder.budgets.fill_(100)
    decoder.generated.fill_(5)

    full = torch.full((2, model.config.vocab_size), float("-inf"))
    full[:, rows] = logits
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.9),
        ]
    )(history, full)
    ours = decoder.next_token_scores(logits)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(hf[:, rows]))
    torch.testing.assert_close(ours.softmax(-1), hf[:, rows].softmax(-1))


def test_gumbel_max_draws_follow_the_softmax():
    torch.manual_seed(0)
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(40_000, -1)
    counts = torch.bincount(gumbel_max_sample(scores), minlength=5).float() / scores.shape[0]
    torch.testing.assert_close(counts, scores[0].softmax(-1), atol=0.01, rtol=0)
    assert counts[-1] == 0


def test_static_decoding_streams_the_offline_waveform(tiny):
    model, processor = tiny
    inputs = processor(task="tts", text="five one seven")
    offline = model.generate(**inputs, do_sample=False, output_audio=True).audio[0]
    chunks = list(model.generate_stream(**inputs, do_sample=False, static_decoding=True, first_chunk_tokens=7))
    joined = torch.cat(chunks)
    assert joined.numel() == offline.numel()
    assert 10 * torch.log10(offline.pow(2).sum() / (offline - joined).pow(2).sum().clamp(min=1e-20)) > 30


def test_unsupported_settings_are_named(tiny):
    model, processor = tiny
    inputs = processor(task="tts", text="one")
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(**inputs, static_decoding=True, num_beams=2)
    with pytest.raises(ValueError, match="logits processors"):
        model.generate(**inputs, static_decoding=True, logits_processor=LogitsProcessorList([TopKLogitsWarper(3)]))


@pytest.fixture(scope="module", params=["stock", "fused"])
def tiny_on_gpu(request):
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval().to("cuda")
    if request.param == "fused":
        model.fuse_projections()
    return model, GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)


def test_cuda_graph_decoding_equals_generate(tiny_on_gpu, clips):
    model, processor = tiny_on_gpu
    for task, inputs in requests(processor, clips).items():
        expected = model.generate(**inputs, task=task, do_sample=False)
        for _ in range(2):  # the second request replays the graph captured during the first
            assert torch.equal(model.generate(**inputs, task=task, do_sample=False, static_decoding=True), expected)


def test_compiled_cuda_graph_decoding_equals_generate(tiny_on_gpu, clips):
    model, processor = tiny_on_gpu
    inputs = requests(processor, clips)["tts"]
    expected = model.generate(**inputs, do_sample=False)
    for _ in range(2):
        result = model.generate(**inputs, do_sample=False, static_decoding=True, compile_decoding=True)
        assert torch.equal(result, expected)


def test_cuda_graphs_replay_the_function_per_shape_and_version():
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    weight = torch.randn(8, 8, device="cuda")
    graphs = GpaCudaGraphs(lambda values: (values @ weight).relu())
    for _ in range(2):  # captured, then replayed
        for rows in (3, 5):
            values = torch.randn(rows, 8, device="cuda")
            torch.testing.assert_close(graphs(values, version=1), (values @ weight).relu())
    assert len(graphs.graphs) == 2
    first = graphs(values, version=1)
    graphs(values + 1, version=1)
    assert not torch.equal(first, graphs(values + 1, version=1))  # replays return copies, not the shared buffer
    graphs(values, version=2)
    assert len(graphs.graphs) == 3


def test_codec_graphs_decode_as_the_codec_does(tiny_on_gpu):
    model, _ = tiny_on_gpu
    codec = model.config.bicodec_config
    voice = torch.randint(0, codec.global_codebook_size, (2, codec.num_global_tokens), device="cuda")
    codes = torch.randint(0, codec.codebook_size, (2, 70), device="cuda")
    lengths = torch.tensor([70, 41], device="cuda")
    expected = model.bicodec.decode(codes, voice, lengths).audio_values
    captured = model.synthesize(codes, voice, lengths, cuda_graphs=True)  # padded to 96 frames, captured
    replayed = model.synthesize(codes, voice, lengths, cuda_graphs=True)
    assert replayed.shape == expected.shape and not replayed[1, 41 * codec.hop_length :].any()
    torch.testing.assert_close(replayed, captured, rtol=0, atol=1e-4)
    # cuDNN picks its convolution algorithms (TF32 included) by length: padding changes the rounding (78 dB on an
    # H100), not the audio. With TF32 in the pitch path, the harmonics' phase drifted: 21 dB.
    snr = 10 * torch.log10(expected.pow(2).sum() / (expected - replayed).pow(2).sum().clamp(min=1e-20))
    assert snr > 40


def test_cuda_graph_streaming_joins_to_the_offline_waveform(tiny_on_gpu):
    model, processor = tiny_on_gpu
    inputs = processor(task="tts", text="five one seven")
    offline = model.generate(**inputs, do_sample=False, static_decoding=True, output_audio=True).audio[0]
    joined = torch.cat(list(model.generate_stream(**inputs, do_sample=False, static_decoding=True)))
    assert joined.numel() == offline.numel()
    assert 10 * torch.log10(offline.pow(2).sum() / (offline - joined).pow(2).sum().clamp(min=1e-20)) > 30
