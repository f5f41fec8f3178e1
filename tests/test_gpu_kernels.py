"""gpa-hf's fused Triton decoding step (`compile_decoding="triton"`) against the stock Qwen3 layers.

Without a GPU the kernels run in Triton's interpreter (conftest.py turns it on), on CPU tensors: the same programs,
each op in numpy (about 0.1 s a kernel launch here, so the cases are small).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

pytest.importorskip("triton", reason="the fused decoding step is written in Triton (pip install triton)")

from compile_gpu_kernels import HEAD_DIMS, LAYER_SHAPES
from transformers import Qwen3Config, Qwen3Model, StaticCache

import gpa_hf
from gpa_hf import GpaForConditionalGeneration, GpaProcessor, gpu_kernels
from gpa_hf.generation_gpa import CACHE_ARGUMENT, GpaStaticDecoder, fused_decoding_step
from gpa_hf.gpu_kernels import FusedStepBlocks, GpaFusedDecodingStep, fused_step_unsupported
from gpa_hf.modeling_gpa import GpaFusedAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HELDOUT = FIXTURES / "gpa_tiny_heldout"
# Few, large programs: the interpreter's time goes by program. The defaults (many small programs) run in one case.
LARGE_BLOCKS = FusedStepBlocks(qkv_block_n=64, output_block_n=64, gate_up_block_n=64, down_block_n=64)


def compiled_triton_environment() -> dict[str, str]:
    """This process's environment without the interpreter switch: a child process imports compiled kernels."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def small_lm(fused: bool) -> Qwen3Model:
    """Two layers with gpa-tiny's head layout: head size 48 (not a power of two), two queries per key-value head."""
    torch.manual_seed(0)
    config = Qwen3Config(**LAYER_SHAPES["tiny"], head_dim=HEAD_DIMS["tiny"], num_hidden_layers=2, vocab_size=300)
    lm = Qwen3Model(config).eval().to(DEVICE)
    for layer in lm.layers:  # trained-looking norms: the stock ones are all ones
        for norm in (layer.input_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.data.uniform_(0.5, 1.5)
        if fused:
            layer.self_attn = GpaFusedAttention.from_attention(layer.self_attn)
    return lm


def prefilled(lm: Qwen3Model, input_ids: torch.Tensor, padding: torch.Tensor, max_cache_len: int):
    """A `StaticCache` holding left-padded prompts (as the static decoder writes them), and the attended map."""
    batch, length = input_ids.shape
    valid = torch.ones(batch, max_cache_len, dtype=torch.bool, device=DEVICE)
    valid[:, :length] = torch.arange(length, device=DEVICE)[None] >= padding[:, None]
    positions = (valid[:, :length].long().cumsum(-1) - 1).clamp(min=0)
    slots = torch.arange(max_cache_len, device=DEVICE)
    query = torch.arange(length, device=DEVICE)[:, None]
    mask = (((slots <= query) & valid[:, None, :]) | (slots == query))[:, None]
    cache = StaticCache(config=lm.config, max_cache_len=max_cache_len)
    lm(
        input_ids=input_ids,
        attention_mask={"full_attention": mask},
        position_ids=positions,
        use_cache=True,
        **{CACHE_ARGUMENT: cache},
    )
    return cache, valid


def stock_step(lm, cache, valid, tokens, slot, padding) -> torch.Tensor:
    """`Qwen3Model`'s own hidden states for one new token per sequence over a prefilled static cache."""
    mask = ((torch.arange(valid.shape[1], device=DEVICE) <= slot) & valid)[:, None, None, :]
    return lm(
        input_ids=tokens[:, None],
        attention_mask={"full_attention": mask},
        position_ids=(slot - padding)[:, None],
        use_cache=True,
        **{CACHE_ARGUMENT: cache},
    ).last_hidden_state[:, -1]


@pytest.mark.parametrize(
    ("fused", "blocks"),
    [(False, None), (True, LARGE_BLOCKS), (True, FusedStepBlocks(max_splits=4, attention_block=8))],
)
def test_fused_step_matches_the_stock_layers(fused, blocks):
    lm = small_lm(fused)
    max_cache_len, prompt_length = 64, 40
    input_ids = torch.randint(0, 300, (2, prompt_length), device=DEVICE)
    # The second prompt's padding fills the first split (16 positions with max_splits=4) and part of the second.
    padding = torch.tensor([0, 21], device=DEVICE)
    tokens = torch.randint(0, 300, (2,), device=DEVICE)
    slot = torch.tensor([prompt_length], device=DEVICE)
    with torch.no_grad():
        stock_cache, valid = prefilled(lm, input_ids, padding, max_cache_len)
        fused_cache, _ = prefilled(lm, input_ids, padding, max_cache_len)
        expected = stock_step(lm, stock_cache, valid, tokens, slot, padding)
        step = GpaFusedDecodingStep(lm, 2, max_cache_len, blocks)
        if blocks is not None and blocks.max_splits == 4:  # chunks of 16 positions: the first all padding
            assert (step.chunk, step.splits) == (16, 4)
        hidden = step(tokens, slot - padding, slot, valid, fused_cache)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)
    for stock, fused_layer in zip(stock_cache.layers, fused_cache.layers):  # the new keys and values, written
        torch.testing.assert_close(fused_layer.keys, stock.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(fused_layer.values, stock.values, rtol=0, atol=1e-5)


def test_bfloat16_step_is_as_close_to_float32_as_the_stock_one():
    """In bf16 (the GPU setting) the fused step rounds less (float32 residual stream and products): its hidden states
    are nearer those of the same weights in float32 than the stock bf16 layers' are."""
    lm = small_lm(fused=True).to(torch.bfloat16)
    reference_lm = copy.deepcopy(lm).float()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (2, 40), generator=generator).to(DEVICE)
    tokens = torch.randint(0, 300, (2,), generator=generator).to(DEVICE)
    padding, slot = torch.tensor([0, 21], device=DEVICE), torch.tensor([40], device=DEVICE)
    with torch.no_grad():
        stock_cache, valid = prefilled(lm, input_ids, padding, 64)
        fused_cache, _ = prefilled(lm, input_ids, padding, 64)
        reference_cache, _ = prefilled(reference_lm, input_ids, padding, 64)
        stock = stock_step(lm, stock_cache, valid, tokens, slot, padding)
        fused = GpaFusedDecodingStep(lm, 2, 64, LARGE_BLOCKS)(tokens, slot - padding, slot, valid, fused_cache)
        reference = stock_step(reference_lm, reference_cache, valid, tokens, slot, padding)
    assert fused.dtype == torch.bfloat16

    def relative_error(hidden: torch.Tensor) -> float:
        return float((hidden.float() - reference).norm() / reference.norm())

    assert relative_error(fused) <= relative_error(stock) < 0.02


@pytest.mark.parametrize(("task", "do_sample"), [("tts", False), ("asr", False), ("tts", True)])
def test_triton_decoding_gives_the_static_decoding_tokens(monkeypatch, task, do_sample):
    """gpa-tiny, two prompts of different lengths: the fused steps pick the tokens the stock ones do (ASR: prompts of
    60 positions, over several 16-position splits of the cache, and the full output layer). Sampling draws the same
    random numbers in the same order (one uniform per row and output row, each step), so one seed gives one result.
    """
    monkeypatch.setattr(gpu_kernels, "DEFAULT_FUSED_STEP_BLOCKS", LARGE_BLOCKS)
    model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL).eval().to(DEVICE)
    processor = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)
    if task == "tts":
        inputs = processor(task="tts", text=["three one four", "nine"])
    else:
        clips = json.loads((HELDOUT / "clips.json").read_text())[:2]
        inputs = processor(task="asr", audio=[str(HELDOUT / clip["audio"]) for clip in clips])
    inputs = inputs.to(DEVICE)
    settings = {"do_sample": do_sample, "max_new_tokens": 6, "static_decoding": True}
    torch.manual_seed(3)
    expected = model.generate(**inputs, **settings)
    torch.manual_seed(3)
    result = model.generate(**inputs, compile_decoding="triton", **settings)
    assert torch.equal(result, expected)
    (decoder,) = [decoder for decoder in model.static_decoders.values() if decoder.fused_step is not None]
    assert isinstance(decoder, GpaStaticDecoder) and isinstance(decoder.cache, StaticCache)
    assert decoder.fused_step.splits > 1


def test_unsupported_models_are_named():
    config = Qwen3Config(hidden_act="gelu", attention_bias=True, num_attention_heads=6, num_key_value_heads=4)
    problems = fused_step_unsupported(config)
    assert any("hidden_act='gelu'" in problem for problem in problems)
    assert "attention_bias=True" in problems
    assert "6 query heads over 4 key-value heads" in problems
    lm = small_lm(fused=True)
    lm.layers[1].mlp.down_proj = torch.ao.nn.quantized.dynamic.Linear(576, 192)
    with pytest.raises(ValueError, match=r"down_proj is a torch\.ao\.nn\.quantized\.dynamic.*Linear"):
        GpaFusedDecodingStep(lm, 1, 64)
    lm = small_lm(fused=False)
    lm.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="does not support hidden_act='gelu'"):
        GpaFusedDecodingStep(lm, 1, 64)
    with pytest.raises(ValueError, match=r"at most 2\*\*31 cached numbers a layer; batch 4096 x cache length 8192"):
        GpaFusedDecodingStep(small_lm(fused=False), 4096, 8192)
    step = GpaFusedDecodingStep(small_lm(fused=False), 2, 64)
    with pytest.raises(ValueError, match="built for batch size 2; got 1"):
        step(*(torch.zeros(1, dtype=torch.long, device=DEVICE),) * 3, None, None)


def test_a_cpu_model_is_refused_outside_the_interpreter():
    """Compiled Triton kernels run on CUDA tensors only: a CPU model is refused by name, not crashed into."""
    code = (
        "import gpa_hf; from gpa_hf import GpaForConditionalGeneration, GpaProcessor\n"
        "model = GpaForConditionalGeneration.from_pretrained(gpa_hf.DEFAULT_MODEL)\n"
        "inputs = GpaProcessor.from_pretrained(gpa_hf.DEFAULT_MODEL)(task='tts', text='one')\n"
        "model.generate(**inputs, static_decoding=True, compile_decoding='triton')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=compiled_triton_environment(), capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "ValueError: the fused decoding step runs on CUDA devices (the LM is on cpu)" in result.stderr


def test_a_missing_triton_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "gpa_hf.gpu_kernels")
    with pytest.raises(ImportError, match="compile_decoding='triton' needs the triton package"):
        fused_decoding_step(small_lm(fused=False), 1, 64)


@pytest.mark.parametrize(("arch", "batch", "shapes"), [(90, 1, "published"), (90, 8, "published"), (80, 3, "tiny")])
def test_kernels_compile_for_gpus_without_spilling(arch, batch, shapes):
    """Triton's own compiler (ptxas included; no GPU needed) builds every launch of a step, the default tiles fit in
    registers and the products load their weights in 16-byte vectors. The interpreter runs what the compiler would
    reject (a variable of two pointer types)."""
    script = Path(__file__).parent / "compile_gpu_kernels.py"
    command = [sys.executable, str(script), "--arch", str(arch), "--batch", str(batch)]
    result = subprocess.run([*command, "--shapes", shapes], env=compiled_triton_environment(), capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(result.stdout)
    assert [name.split(":")[1] for name in report] == [
        "rms_norm_linear_kernel",
        "attention_split_kernel",
        "attention_merge_kernel",
        "linear_residual_kernel",
        "rms_norm_linear_kernel",
        "linear_residual_kernel",
    ]
    assert {name: usage["stack_bytes"] for name, usage in report.items() if usage["stack_bytes"]} == {}
    # The products read their weights 16 bytes at a time (one load per 8 bf16 numbers), never one number at a time.
    products = {name: usage["loads"] for name, usage in report.items() if "linear" in name}
    assert all("b16" not in loads and loads.get("v4.b32", 0) > 0 for loads in products.values()), products
    # Hopper on: each kernel waits for the previous one, then lets the next one start (programmatic dependent
    # launch); before they wait, the products load their weights and the attention the positions cached by earlier
    # steps; the merge has nothing to load before.
    waits = {name: (usage["grid_dependency"], usage["loads_before_wait"] > 0) for name, usage in report.items()}
    launched = ["wait", "launch_dependents"] if arch >= 90 else []
    assert waits == {name: (launched, arch >= 90 and "merge" not in name) for name in report}, waits
