"""gpa-hf's C++ CPU kernel for a decoding step's attention (`gpa_hf::one_query_attention`)."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import gpa_hf
from gpa_hf import GpaForConditionalGeneration, GpaProcessor, cpu_kernels, modeling_gpa
from gpa_hf.generation_gpa import GpaPackedInt8Linear
from gpa_hf.modeling_gpa import one_query_attention


@pytest.fixture(scope="module")
def kernel():
    assert cpu_kernels.load_cpu_kernels(), "the kernel must build where tests run (a C++ compiler is installed)"
    return torch.ops.gpa_hf.one_query_attention


def cache_slices(batch, heads, length, dim, dtype, generator):
    """Keys and values as a compiled step reads them: the first `length` positions of longer buffers."""
    buffers = [torch.randn(batch, heads, length + 9, dim, generator=generator).to(dtype) for _ in range(2)]
    return [buffer[:, :, :length] for buffer in buffers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("groups", "dim"), [(1, 48), (2, 48), (2, 128), (4, 64), (8, 128), (2, 96)])
def test_kernel_equals_sdpa(kernel, dtype, groups, dim):
    """Same attention as SDPA over the same (bfloat16: upcast) keys and values, with and without a padding mask,
    for the head sizes with a fixed-size path (64, 128) and others."""
    generator = torch.Generator().manual_seed(groups * dim)
    query = torch.randn(3, 2, groups, dim, generator=generator)
    key, value = cache_slices(3, 2, 37, dim, dtype, generator)
    valid = torch.rand(3, 50, generator=generator) > 0.3
    valid[:, 36] = True  # the step's own token
    for mask in (None, valid[:, None, None, :37]):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, key.float(), value.float(), attn_mask=mask, scale=0.3
        )
        torch.testing.assert_close(kernel(query, key, value, mask, 0.3), expected, rtol=1e-5, atol=1e-5)


def test_kernel_names_what_it_cannot_take(kernel):
    query, key = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 5, 16)
    with pytest.raises(RuntimeError, match="float32 queries expected, got BFloat16"):
        kernel(query.bfloat16(), key, key, None, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 keys and values expected, got Half"):
        kernel(query, key.half(), key.half(), None, 1.0)
    with pytest.raises(RuntimeError, match="1, 2, 4 or 8 queries per key-value head, got 3"):
        kernel(torch.randn(2, 2, 3, 16), key, key, None, 1.0)
    with pytest.raises(RuntimeError, match=r"a bool mask \(batch, 1, 1, positions\) expected, got Float"):
        kernel(query, key, key, torch.zeros(2, 1, 1, 5), 1.0)
    with pytest.raises(RuntimeError, match="key and value rows must be contiguous"):
        strided = torch.randn(2, 2, 16, 5).transpose(2, 3)
        kernel(query, strided, strided, None, 1.0)
    with pytest.raises(RuntimeError, match="do not match keys"):
        kernel(query, torch.randn(2, 2, 5, 32), torch.randn(2, 2, 5, 32), None, 1.0)


def test_a_kernel_that_cannot_be_built_is_named_and_sdpa_attends(monkeypatch):
    """Without a working C++ toolchain the build fails once, with a warning that says why, and steps keep SDPA."""
    from torch.utils import cpp_extension

    attempts = []

    def no_compiler(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("Error building extension: c++ not found")

    monkeypatch.setattr(cpu_kernels, "_built", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    message = (
        "could not be built, decoding steps attend with SDPA and compiled int8 steps run oneDNN's products: "
        "Error building"
    )
    with pytest.warns(UserWarning, match=message):
        assert not cpu_kernels.load_cpu_kernels()
    assert not cpu_kernels.load_cpu_kernels()
    assert len(attempts) == 1  # tried once per process
    query, key = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 5, 16)
    assert not cpu_kernels.one_query_attention_supported(query, key, None)


@pytest.mark.parametrize("with_kernel", [True, False])
def test_one_query_attention_equals_attention_over_repeated_keys(kernel, monkeypatch, with_kernel):
    """Grouped-query attention of one token, by the kernel or (where it is not loaded) by SDPA over grouped queries."""
    monkeypatch.setattr(cpu_kernels, "_built", with_kernel)
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., :7] = False  # a left-padded row
    repeated = [states.repeat_interleave(4, dim=1) for states in (key, value)]
    for attention_mask in (None, mask):
        expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=attention_mask)
        result = one_query_attention(query, key, value, attention_mask, 16**-0.5)
        torch.testing.assert_close(result, expected.transpose(1, 2).reshape(3, 1, 128))


def test_compiled_cpu_steps_attend_with_the_kernel(kernel):
    """gpa-tiny's compiled CPU step (projections fused, as the CLI and `quantize_lm_dynamic_int8` make it) calls the
    kernel, from inductor's C++ wrapper, and gives the tokens of the eager loop, whose attention is SDPA's."""
    torch.compiler.reset()
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval().fuse_projections()
    inputs = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)(task="tts", text=["two two eight five", "nine"])
    expected = model.generate(**inputs, task="tts", do_sample=False, static_decoding=True)
    options = {"task": "tts", "do_sample": False, "static_decoding": True, "compile_decoding": True}
    result, code = run_and_get_code(lambda: model.generate(**inputs, **options))
    assert any("gpa_hf::one_query_attention" in source or "gpa_hf.one_query_attention" in source for source in code)
    assert torch.equal(result, expected)


def test_fused_cpu_models_attend_with_the_kernel_eagerly(monkeypatch):
    """`fuse_projections` on CPU loads the kernel for LMs with a wide enough cache, and eager one-token steps
    (static loop and `generate`) attend with it, to the tokens SDPA gives; steps that need gradients keep SDPA (the
    kernel has no backward)."""
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval()
    loads = []
    monkeypatch.setattr(modeling_gpa, "load_cpu_kernels", lambda: loads.append(cpu_kernels.load_cpu_kernels()))
    model.fuse_projections()
    assert loads == []  # gpa-tiny's cache is too narrow for the kernel to pay for its first build
    monkeypatch.setattr(modeling_gpa, "MIN_CACHE_WIDTH", cpu_kernels.cache_width(model.config))
    model.fuse_projections()
    assert loads == [True]
    inputs = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)(task="tts", text=["two two eight five", "nine"])
    results = {}
    for static_decoding in (False, True):
        with torch.profiler.profile() as profile:
            results[static_decoding] = model.generate(
                **inputs, task="tts", do_sample=False, static_decoding=static_decoding
            )
        assert "gpa_hf::one_query_attention" in {event.key for event in profile.key_averages()}
    monkeypatch.setattr(cpu_kernels, "_built", False)
    with_sdpa = model.generate(**inputs, task="tts", do_sample=False, static_decoding=True)
    assert torch.equal(results[True], with_sdpa) and torch.equal(results[False], with_sdpa)
    monkeypatch.setattr(cpu_kernels, "_built", True)
    query, key = torch.randn(1, 4, 1, 48, requires_grad=True), torch.randn(1, 2, 5, 48)
    assert not cpu_kernels.one_query_attention_supported(query, key, None)
    assert cpu_kernels.one_query_attention_supported(query.detach(), key, None)


def int8_layer(in_features: int = 64, out_features: int = 96) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(in_features, out_features)),
            {torch.nn.Linear: modeling_gpa.INT8_QCONFIG},
            dtype=torch.qint8,
        )[0]


def test_int8_linear_runs_the_layers_own_product(kernel):
    """`gpa_hf::int8_linear` gives the torch.ao layer's output exactly, eagerly and compiled (from inductor's C++
    wrapper), names what it cannot take, and drops a layer's weights with its `GpaPackedInt8Linear` (a deep copy keeps
    its own)."""
    quantized = int8_layer()
    layer = GpaPackedInt8Linear(quantized)
    for inputs in (torch.randn(3, 64), torch.randn(2, 5, 64), torch.randn(5, 2, 64).transpose(0, 1)):
        assert torch.equal(layer(inputs), quantized(inputs))
    inputs = torch.randn(4, 64)
    with torch.no_grad(), torch._inductor.config.patch(cpp_wrapper=True):
        compiled, code = run_and_get_code(torch.compile(layer), inputs)
    assert any("gpa_hf::int8_linear" in source or "gpa_hf.int8_linear" in source for source in code)
    assert torch.equal(compiled, quantized(inputs))
    with pytest.raises(RuntimeError, match="expected a float32 input, got BFloat16"):
        layer(inputs.bfloat16())
    with pytest.raises(RuntimeError, match="expected a LinearPackedParamsBase, got Tensor"):
        torch.ops.gpa_hf.register_int8_linear(torch.zeros(1), True)
    copied = copy.deepcopy(layer)
    number = layer.number
    del layer, compiled, code
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no registered layer {number}"):
        torch.ops.gpa_hf.int8_linear(inputs, number)
    assert copied.number != number and torch.equal(copied(inputs), quantized(inputs))


def test_compiled_int8_steps_run_the_eager_int8_products(kernel):
    """gpa-tiny's int8 LM compiled for CPU steps calls its layers' own packed products and gives the eager int8
    loop's tokens; a float weight changed in place is read as it is, with no recompilation."""
    torch.compiler.reset()
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval().quantize_lm_dynamic_int8()
    processor = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)
    inputs = processor(task="tts", text=["two two eight five", "nine"])
    expected = model.generate(**inputs, task="tts", do_sample=False, static_decoding=True)
    options = {"task": "tts", "do_sample": False, "static_decoding": True, "compile_decoding": True}
    result, code = run_and_get_code(lambda: model.generate(**inputs, **options))
    assert any("gpa_hf::int8_linear" in source or "gpa_hf.int8_linear" in source for source in code)
    assert not any("qlinear" in source for source in code)
    assert torch.equal(result, expected)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        model.model.norm.weight.neg_()
    changed = model.generate(**inputs, task="tts", do_sample=False, static_decoding=True)
    assert not torch.equal(changed, expected)
    assert torch.equal(model.generate(**inputs, **options), changed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
