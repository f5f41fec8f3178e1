"""Per-task generation for GPA: the defaults, the output constraint and the length budget, in one place."""

from __future__ import annotations

import copy
import inspect
import queue
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.ao.quantization.fx._decomposed  # registers the ops `GpaTraceableInt8Linear` is written in
from torch import nn
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, Qwen3Model, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from .configuration_gpa import GpaVocabularyLayout
from .cpu_kernels import int8_linear_supported, load_cpu_kernels, register_int8_linear, release_int8_linear

if TYPE_CHECKING:  # importing it imports triton, which only the fused step needs
    from .gpu_kernels import GpaFusedDecodingStep

# Saved into generation_config.json as `task_defaults`; whatever the caller passes to `generate` wins.
TASK_GENERATION_DEFAULTS: dict[str, dict] = {
    "asr": {"do_sample": False, "repetition_penalty": 1.0},
    "tts": {"do_sample": True, "temperature": 0.2, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.2},
    "vc": {"do_sample": True, "temperature": 0.2, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.2},
}

# Length budgets (new tokens), from what the prompt holds. Semantic tokens run at 50/s, GLM tokens at 12.5/s.
TTS_TOKENS_PER_TEXT_TOKEN = 25  # about 0.5 s of speech per text token, twice a slow speaking rate
TTS_BASE_TOKENS = 100
ASR_TOKENS_PER_GLM_TOKEN = 1  # 12.5 text tokens per second of audio
ASR_BASE_TOKENS = 16
VC_TOKENS_PER_SOURCE_TOKEN = 2
VC_BASE_TOKENS = 50


def build_generation_config(layout: GpaVocabularyLayout, pad_token_id: int) -> GenerationConfig:
    """The generation config saved with a GPA model: stop on `<|im_end|>`, the per-task defaults as `task_defaults`.

    Sampling settings live only under `task_defaults`, so that no task inherits another task's.
    """
    config = GenerationConfig(eos_token_id=layout.stop, pad_token_id=pad_token_id, do_sample=False)
    config.task_defaults = TASK_GENERATION_DEFAULTS
    return config


def length_budget(
    task: str, layout: GpaVocabularyLayout, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.LongTensor:
    """New tokens each prompt may need: from the text length (TTS), source duration (VC) or audio duration (ASR)."""
    valid = attention_mask.bool()
    if task == "tts":
        text = ((input_ids < layout.text_vocab_size) & valid).sum(-1)
        return TTS_BASE_TOKENS + TTS_TOKENS_PER_TEXT_TOKEN * text
    if task == "vc":
        semantic = layout.block_mask(input_ids, "semantic")
        return VC_BASE_TOKENS + VC_TOKENS_PER_SOURCE_TOKEN * (semantic & valid).sum(-1)
    glm = layout.block_mask(input_ids, "glm")
    return ASR_BASE_TOKENS + ASR_TOKENS_PER_GLM_TOKEN * (glm & valid).sum(-1)


def allowed_token_mask(task: str, layout: GpaVocabularyLayout, vocab_size: int) -> torch.BoolTensor:
    """TTS and VC emit semantic tokens and the stop token; ASR emits text, `<|end_content|>` and the stop token."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    if task == "asr":
        allowed[: layout.text_vocab_size] = True
        allowed[layout.end_content] = True
    else:
        allowed[layout.semantic_offset : layout.semantic_offset + layout.semantic_size] = True
    allowed[layout.stop] = True
    return allowed


class GpaTaskLogitsProcessor(LogitsProcessor):
    """Restricts each step to the tokens the task may emit, and stops each row once it has used its budget."""

    def __init__(self, allowed: torch.BoolTensor, stop_token_id: int, prompt_length: int, budgets: torch.Tensor):
        self.allowed = allowed
        self.stop_token_id = stop_token_id
        self.prompt_length = prompt_length
        self.budgets = budgets

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed.to(scores.device)
        scores = scores.masked_fill(~allowed[: scores.shape[-1]], float("-inf"))
        exhausted = (input_ids.shape[1] - self.prompt_length) >= self.budgets.to(scores.device)
        if exhausted.any():
            forced = torch.full_like(scores[0], float("-inf"))
            forced[self.stop_token_id] = 0.0
            scores = torch.where(exhausted[:, None], forced[None], scores)
        return scores


class GpaAllowedRowsHead(nn.Module):
    """Output layer for constrained decoding: multiplies only the rows a task may emit; the others are -inf.

    TTS and VC may emit 8,193 of the ~180k rows, so a decoding step reads 4% of the output layer instead of all of
    it (the output layer is about 30% of the published LM's weights). The logits of the allowed rows are exactly
    those of the full layer, so outputs do not change.
    """

    def __init__(self, lm_head: nn.Linear, allowed: torch.BoolTensor):
        super().__init__()
        rows = allowed[: lm_head.out_features].nonzero().squeeze(-1).to(lm_head.weight.device)
        self.vocab_size = lm_head.out_features
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("weight", lm_head.weight.detach()[rows].contiguous(), persistent=False)
        bias = None if lm_head.bias is None else lm_head.bias.detach()[rows].contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        allowed_logits = nn.functional.linear(hidden_states, self.weight, self.bias)
        logits = allowed_logits.new_full((*hidden_states.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.rows, allowed_logits)


class GpaStreamCancelled(Exception):
    """Raised inside `generate` by the streamer once the stream's consumer has stopped: ends generation early."""


class GpaAudioStreamer(BaseStreamer):
    """Turns the semantic tokens `generate` produces for one prompt into audio chunks, and queues them.

    Chunks are decoded inside `put`, in the generating thread, between two LM steps: the LM and the codec never
    compete for the same cores, and the first chunk is ready as soon as its tokens and right context exist.
    Iterate over the streamer (in another thread) to receive the chunks; iteration ends after the last one.

    Args:
        layout: the vocabulary layout (which ids are semantic tokens, which id stops).
        decode_window: `(codes, start, stop) -> audio of codes[start:stop]`, decoded with context around them.
        first_chunk_tokens / chunk_tokens: tokens of the first and of every later chunk.
        right_context: tokens generated past a chunk before it is decoded.
    """

    def __init__(
        self,
        layout: GpaVocabularyLayout,
        decode_window: Callable[[list[int], int, int], torch.Tensor],
        first_chunk_tokens: int,
        chunk_tokens: int,
        right_context: int,
        timeout: float | None = None,
    ):
        self.layout = layout
        self.decode_window = decode_window
        self.first_chunk_tokens = first_chunk_tokens
        self.chunk_tokens = chunk_tokens
        self.right_context = right_context
        self.timeout = timeout
        self.queue: queue.Queue = queue.Queue()
        self.codes: list[int] = []
        self.emitted = 0
        self.prompt_seen = False
        self.stopped = False
        self.cancelled = threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise GpaStreamCancelled
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        token = int(value.reshape(-1)[0])
        if self.stopped:
            return
        if token == self.layout.stop:
            self.stopped = True
            return
        if self.layout.block_mask(token, "semantic"):
            self.codes.append(token - self.layout.semantic_offset)
        size = self.first_chunk_tokens if self.emitted == 0 else self.chunk_tokens
        if len(self.codes) >= self.emitted + size + self.right_context:
            self.queue.put(self.decode_window(self.codes, self.emitted, self.emitted + size))
            self.emitted += size

    def end(self) -> None:
        if len(self.codes) > self.emitted:
            self.queue.put(self.decode_window(self.codes, self.emitted, len(self.codes)))
            self.emitted = len(self.codes)
        self.close()

    def close(self) -> None:
        """End the iteration without decoding anything more (used when generation failed)."""
        self.queue.put(None)

    def cancel(self) -> None:
        """From the consuming thread, when it stops early: generation raises `GpaStreamCancelled` at its next step."""
        self.cancelled.set()

    def __iter__(self):
        while (chunk := self.queue.get(timeout=self.timeout)) is not None:
            yield chunk

    def ready_chunks(self) -> Iterator[torch.Tensor]:
        """The chunks decoded so far, without waiting: for a consumer in the generating thread."""
        while True:
            try:
                chunk = self.queue.get_nowait()
            except queue.Empty:
                return
            if chunk is None:
                return
            yield chunk


@dataclass(frozen=True)
class StaticDecodingSettings:
    """The generation settings the static decoding loop supports (all that GPA's task defaults use)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    min_new_tokens: int

    # Settings of `GenerationConfig` the loop does not implement, with the value at which they do nothing.
    UNSUPPORTED = {
        "num_beams": 1,
        "num_return_sequences": 1,
        "no_repeat_ngram_size": None,
        "bad_words_ids": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
        "sequence_bias": None,
        "typical_p": 1.0,
        "min_p": None,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "guidance_scale": None,
        "encoder_repetition_penalty": 1.0,
        "force_words_ids": None,
        "constraints": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "exponential_decay_length_penalty": None,
        "watermarking_config": None,
        "assistant_model": None,
        "return_dict_in_generate": False,
        "output_scores": False,
        "output_logits": False,
    }

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> StaticDecodingSettings:
        unsupported = [
            f"{name}={getattr(config, name)!r}"
            for name, inactive in cls.UNSUPPORTED.items()
            if getattr(config, name, inactive) not in (inactive, None, [])
        ]
        if unsupported:
            raise ValueError(
                f"static_decoding supports greedy decoding and sampling with temperature, top_k, top_p, "
                f"repetition_penalty and min_new_tokens; got {', '.join(unsupported)}"
            )
        sample = bool(config.do_sample)
        return cls(
            do_sample=sample,
            temperature=float(config.temperature or 1.0) if sample else 1.0,
            top_k=int(config.top_k or 0) if sample else 0,
            top_p=float(config.top_p if config.top_p is not None else 1.0) if sample else 1.0,
            repetition_penalty=float(config.repetition_penalty or 1.0),
            min_new_tokens=int(config.min_new_tokens or 0),
        )


def gumbel_max_sample(scores: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.LongTensor:
    """One draw per row from softmax(`scores`), as `multinomial` would, without a host sync (graph-safe).

    `uniform`: the draw's uniform random numbers, shaped as `scores` (default: drawn here).
    """
    uniform = (torch.rand_like(scores) if uniform is None else uniform).clamp(min=torch.finfo(scores.dtype).tiny)
    return (scores - torch.log(-torch.log(uniform))).argmax(-1)


# Steps between two looks at the host in static decoding: a few wasted steps at the end, against a sync per step.
STATIC_DECODING_SYNC_EVERY = 8

# `Qwen3Model.forward` names its cache argument `cache` in recent transformers, `past_key_values` before.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"


# Positions an appending cache layer adds when it runs out of room: one copy of the cache per this many steps.
CACHE_GROWTH = 128


class GpaAppendingCacheLayer(DynamicLayer):
    """A `DynamicLayer` that writes each step's keys and values into spare room instead of concatenating.

    `DynamicLayer.update` copies its whole cache at every step (`torch.cat`), so a request's steps copy a cache that
    grows with it. On CPU that copying is a measurable share of a decoding step of this small LM (published size, 200
    semantic tokens after a 75-token prompt, dynamic int8, 2 cores: it costs batch 1 4-10% of its decoding time,
    batch 8 about 23%). This layer keeps keys and values in buffers with room for up to `CACHE_GROWTH` more
    positions and hands attention views of their filled part; a full buffer is replaced by a larger one (one copy).
    `DynamicLayer` methods that replace the keys and values (crop, beam reordering, batch selection, offloading)
    keep working: the next update moves what they left into fresh buffers.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not self.holds_its_buffers() or end > self.key_buffer.shape[-2]:
            self.key_buffer = self.larger_buffer(self.keys, key_states, start, end)
            self.value_buffer = self.larger_buffer(self.values, value_states, start, end)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def holds_its_buffers(self) -> bool:
        """Whether the keys are still the view of the buffer that the last update handed out."""
        return (
            self.key_buffer is not None
            and self.keys.data_ptr() == self.key_buffer.data_ptr()
            and self.keys.shape[:-2] == self.key_buffer.shape[:-2]
            and self.keys.stride() == self.key_buffer.stride()
        )

    @staticmethod
    def larger_buffer(cached: torch.Tensor, new: torch.Tensor, start: int, end: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:-2], round_up(end, CACHE_GROWTH), new.shape[-1])
        if start:
            buffer[..., :start, :] = cached
        return buffer


class GpaDecodingCache(DynamicCache):
    """The KV cache `GpaForConditionalGeneration.generate` decodes with: a `DynamicCache` of appending layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GpaAppendingCacheLayer


QUANTIZED_DECOMPOSED = torch.ops.quantized_decomposed


class GpaTraceableInt8Linear(nn.Module):
    """A dynamic int8 linear layer that `torch.compile` can trace: for compiled CPU decoding steps.

    torch.ao's dynamic int8 layers (what `quantize_lm_dynamic_int8` makes: fbgemm, fast eagerly) keep their weights
    in packed objects that dynamo cannot trace, so a compiled step would break its graph at every product. This layer
    holds the same int8 weights and per-row scales as tensors and spells the product out as quantize (the input, one
    uint8 scale per call) -> dequantize -> linear. With `torch._inductor.config.freezing`, inductor recognises that
    pattern and runs oneDNN's int8 product on weights it packs once (VNNI / AMX), with the input's quantization and a
    following residual addition fused around it. Eagerly it dequantizes the whole weight at every call: it is only
    meant to be compiled. Compiled steps use it where [`GpaPackedInt8Linear`] cannot run (no C++ compiler).
    """

    def __init__(self, quantized: nn.Module):
        super().__init__()
        weight = quantized.weight()  # qint8, one scale per output row (`INT8_QCONFIG`), zero points 0
        self.register_buffer("weight", weight.int_repr())
        self.register_buffer("weight_scale", weight.q_per_channel_scales().float())
        self.register_buffer("weight_zero_point", weight.q_per_channel_zero_points())
        self.register_buffer("bias", quantized.bias())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops, uint8, int8 = QUANTIZED_DECOMPOSED, torch.uint8, torch.int8
        scale, zero_point = ops.choose_qparams.tensor(hidden_states, 0, 255, torch.finfo(torch.float32).eps, uint8)
        quantized = ops.quantize_per_tensor.tensor(hidden_states, scale, zero_point, 0, 255, uint8)
        hidden_states = ops.dequantize_per_tensor.tensor(quantized, scale, zero_point, 0, 255, uint8)
        weight = ops.dequantize_per_channel(self.weight, self.weight_scale, self.weight_zero_point, 0, -128, 127, int8)
        return nn.functional.linear(hidden_states, weight, self.bias)


class GpaPackedInt8Linear(nn.Module):
    """A torch.ao dynamic int8 linear layer as one opaque op of compiled CPU steps: the layer's own packed product.

    `gpa_hf::int8_linear` (`gpa_hf.cpu_kernels`) runs the eager layer's product (fbgemm on x86) by the number the
    layer was registered under: the eager int8 loop's values, no second copy of the weights, and faster than the
    oneDNN products that [`GpaTraceableInt8Linear`] compiles to (published size, 2 threads, 200 tokens alternated in
    one process, the LM part of a compiled batch-1 request: 2.90 s against 4.05-4.11 s; compiling 122 s against 204 s).
    The registration is dropped with this module; a deep copy registers the copied layer.
    """

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.number = register_int8_linear(quantized)
        self.__dict__["quantized"] = quantized  # not a submodule: the compiled step never calls it
        weakref.finalize(self, release_int8_linear, self.number).atexit = False

    def __deepcopy__(self, memo: dict) -> GpaPackedInt8Linear:
        return type(self)(copy.deepcopy(self.quantized, memo))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.gpa_hf.int8_linear(hidden_states, self.number)


def with_traceable_int8(module: nn.Module) -> nn.Module:
    """`module` if it holds no torch.ao dynamic int8 linear layer, else a shallow copy with traceable ones.

    The copy shares every other submodule, parameter and buffer with `module`; the original is left as it is. Its
    int8 layers are [`GpaPackedInt8Linear`] where gpa-hf's CPU kernels are loaded, else [`GpaTraceableInt8Linear`].
    """
    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        return GpaPackedInt8Linear(module) if int8_linear_supported(module) else GpaTraceableInt8Linear(module)
    children = {name: with_traceable_int8(child) for name, child in module.named_children()}
    if all(child is module._modules[name] for name, child in children.items()):
        return module
    shallow = object.__new__(type(module))
    shallow.__dict__ = {**module.__dict__, "_modules": {**module._modules, **children}}
    return shallow


class GpaCompiledCpuStep:
    """The LM of a model, compiled for CPU decoding: its steps, and the prompts' pass.

    CPU steps of this small LM spend more time between ops (Python, module calls, small pointwise kernels) than in
    its products. Compiled, a step is one graph: each layer becomes its four products, the attention (gpa-hf's
    kernel, `gpa_hf.cpu_kernels`, loaded by `fuse_projections` or here) and a few fused C++ kernels, called from C++
    (inductor's `cpp_wrapper`; the usual Python wrapper spent 17 ms of a 47 ms published-size int8 step calling them;
    100 tokens 3.2 s against 4.7-6.1 s, 2 cores). The prompts' pass is a second graph, the prompt's length symbolic,
    so that one serves every prompt (published size, int8, 2 cores: a 254-token ASR prompt's pass and first token
    0.29 s, against 0.43 s eagerly), with the Python wrapper: it runs once a request, and the C++ one took another
    minute to compile.
    An int8 LM's layers run their own packed products ([`GpaPackedInt8Linear`]), and the compiled code reads the LM's
    float weights as they are, as it does a float LM's. Where gpa-hf's kernels cannot be built, they run oneDNN's
    products ([`GpaTraceableInt8Linear`]), compiled with inductor's freezing, which makes the weights constants of
    the compiled code (what oneDNN's packing needs): the float ones are then read as they were when compiled.
    `refresh` compiles again when modules were replaced (fused, quantized). The first request compiles both graphs,
    for two to five minutes at published size on 2 cores.
    """

    def __init__(self, lm: nn.Module, mode: str | None = None):
        self.lm, self.mode = lm, mode
        self.modules: tuple[int, ...] = ()
        self.freeze = False
        self.compiled: Callable | None = None

    def refresh(self) -> None:
        modules = tuple(map(id, self.lm.modules()))
        if modules != self.modules:
            self.modules = modules
            load_cpu_kernels()  # the steps' attention (`one_query_attention`) and int8 products (`int8_linear`)
            traceable = with_traceable_int8(self.lm)
            self.freeze = any(isinstance(layer, GpaTraceableInt8Linear) for layer in traceable.modules())
            # inductor's oneDNN int8 lowering copies its zero points with torch.tensor(tensor): harmless, and noisy
            warnings.filterwarnings("ignore", "To copy construct", module="torch._inductor.mkldnn_lowerings")
            self.compiled = torch.compile(traceable, mode=self.mode)

    def __call__(self, prompts: bool = False, **inputs) -> torch.Tensor:
        """Run the LM compiled; `prompts=True` for the prompts' pass (compiled with the Python wrapper)."""
        # Freezing must be on while dynamo traces (it then treats the weights as constants), not only in inductor.
        with torch._inductor.config.patch(freezing=self.freeze, cpp_wrapper=not prompts):
            return self.compiled(**inputs)


class GpaStepCache:
    """A KV cache of fixed buffers, written at the positions in `slots` and read up to a length, for compiled steps.

    Over `StaticCache`, a step attends over the whole buffer with a mask; over an appending cache, the length it
    attends over is a Python number that would make a compiled step recompile at every token. Here both the write
    positions and the attended length come from tensors (`slots`, and the size of `attended`, which dynamo keeps
    symbolic), so one compiled step serves a whole request and every later one; the buffers' length is symbolic too,
    so decoders of other cache lengths share that step. Prompts are written by `prefill` through the same `update`,
    the only cache method the LM calls when given position ids and masks.
    """

    def __init__(self, config, batch_size: int, max_cache_len: int, device: torch.device, dtype: torch.dtype):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch_size, config.num_key_value_heads, max_cache_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        for buffer in (*self.keys, *self.values):
            torch._dynamo.mark_dynamic(buffer, 2)
        self.positions = torch.arange(max_cache_len, device=device)
        self.slots = self.attended = self.positions[:0]

    def point_at(self, slots: torch.LongTensor, length: int) -> None:
        """Write the next keys and values at `slots`; attend over the first `length` positions."""
        self.slots, self.attended = slots, self.positions[:length]
        torch._dynamo.maybe_mark_dynamic(self.attended, 0)
        torch._dynamo.maybe_mark_dynamic(self.slots, 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slots, key_states)
        self.values[layer_idx].index_copy_(2, self.slots, value_states)
        length = self.attended.shape[0]
        return self.keys[layer_idx][:, :, :length], self.values[layer_idx][:, :, :length]


class GpaCudaGraphs:
    """Runs `function` on CUDA tensors from CUDA graphs, one per input shapes (and `version`), the last `size` of them.

    Small models on a GPU mostly wait for Python to launch their many short kernels; a graph launches all of them
    at once. The first call of a shape runs `function` itself (that is its result) and captures a graph of it; the
    next calls copy their inputs into the graph's input buffers and replay it. A replay returns a copy of the
    captured output (None when `function` returns None: it then works through the state it mutates).
    `version`: anything else the kernels depend on that can change (where the weights are stored, say).
    """

    def __init__(self, function: Callable[..., torch.Tensor | None], size: int = 8):
        self.function = function
        self.size = size
        self.graphs: OrderedDict = OrderedDict()

    def clear(self) -> None:
        self.graphs.clear()

    def __call__(self, *inputs: torch.Tensor, version: Hashable = None) -> torch.Tensor | None:
        key = (tuple((tuple(value.shape), value.dtype, value.device) for value in inputs), version)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            graph, buffers, output = self.graphs[key]
            for buffer, value in zip(buffers, inputs):
                buffer.copy_(value)
            graph.replay()
            return None if output is None else output.clone()
        buffers = tuple(value.clone() for value in inputs)
        # Warm up on a side stream (as capture requires), doing this call's real work, then capture: capture
        # records kernels without running them, so the state the warm-up left stays as it is.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = self.function(*buffers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self.function(*buffers)
        while len(self.graphs) >= self.size:
            self.graphs.popitem(last=False)
        self.graphs[key] = (graph, buffers, output)
        return result


class GpaStaticDecoder:
    """A decoding loop over a static KV cache for one task's output rows; on CUDA, each step is one graph replay.

    The published LM is 28 small layers: on a GPU, `generate` spends a step mostly launching kernels and running
    Python, not computing. This loop captures the whole step (LM forward over the static cache, logits of the
    allowed rows only, repetition penalty, length budget, temperature / top-k / top-p, sampling) once as a CUDA
    graph and replays it; the host looks for the end only every `sync_every` steps. The prompt's pass (prefill)
    is a graph too, one per prompt length: prompts are left-padded to a multiple of `prefill_multiple` tokens
    (32 on CUDA), so that prompts of similar length share one. Greedy decoding gives the tokens of `generate`;
    sampling draws from the same distribution (Gumbel-max instead of `multinomial`). On CPU the same steps run
    eagerly, which is what the tests compare with `generate`; there the cache is an appending one
    ([`GpaDecodingCache`]): a step attends over the filled positions only, and, when no prompt is padded, without a
    mask (masked attention over a cache padded to its full length made a batch-8 CPU step 1.7x slower). A compiled
    CPU step ([`GpaCompiledCpuStep`]) attends over the filled positions of fixed buffers ([`GpaStepCache`]). With
    `compile_step="triton"` the LM part of a step is gpa-hf's fused Triton kernels ([`GpaFusedDecodingStep`]) over a
    static cache.

    One decoder serves one (batch size, cache length, output rows, settings); [`GpaForConditionalGeneration`]
    keeps the last few, so that repeated requests of one shape reuse their graph and cache.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: torch.LongTensor,
        stop_token_id: int,
        pad_token_id: int,
        batch_size: int,
        max_cache_len: int,
        settings: StaticDecodingSettings,
        compile_step: bool | str = False,
        prefill_multiple: int | None = None,
        static_cache: bool | None = None,
    ):
        device = model.device
        self.prefill_multiple = prefill_multiple or prefill_multiple_for(device)
        self.model = model
        # `compile_step="triton"`: gpa-hf's fused Triton kernels run each step, over a static cache.
        self.fused_step = None
        if compile_step == FUSED_TRITON_STEP:
            self.fused_step = fused_decoding_step(model.model, batch_size, max_cache_len)
            # The rest of the step (final norm, output rows, scores, the pick and its bookkeeping) is 45 torch calls
            # for sampled TTS eagerly, a few kernels compiled; its random numbers are drawn outside (`forward_step`).
            self.compiled_tail = torch.compile(self.fused_step_tail, dynamic=False)
            compile_step, static_cache = False, True
        # torch.compile fuses each layer's small pointwise kernels (norms, rotary, activations): the graph holds
        # fewer, so a step takes less time. On CUDA only the one-token step is compiled (prompts are captured as
        # graphs); on CPU the prompts' pass is compiled too, in a graph of its own (`GpaCompiledCpuStep`).
        # A string names the `torch.compile` mode (e.g. "max-autotune-no-cudagraphs": slower to compile).
        mode = compile_step if isinstance(compile_step, str) else None
        self.compiled_on_cpu = bool(compile_step) and device.type != "cuda"
        if self.compiled_on_cpu:  # one per model and mode, shared by its decoders: a new batch size only recompiles
            steps = model.static_decoders.compiled_cpu_steps
            self.step_lm = steps[mode] = steps.get(mode) or GpaCompiledCpuStep(model.model, mode)
        else:
            self.step_lm = torch.compile(model.model, dynamic=False, mode=mode) if compile_step else model.model
        self.settings = settings
        self.rows = rows.to(device)
        # The output rows are pointed at by `refresh_output_rows`, at the start of every request.
        self.head = torch.empty(0)
        self.head_bias: torch.Tensor | None = None
        self.gather_rows = False
        self.full_output_layer: nn.Module | None = None
        self.step_graph = GpaCudaGraphs(self.forward_step, size=1)
        self.prefill_graphs = GpaCudaGraphs(self.prefill)
        # Everything a step uses lives on the device (a CUDA graph cannot copy from host memory).
        self.is_stop_row = self.rows == stop_token_id
        if int(self.is_stop_row.sum()) != 1:
            raise ValueError(f"the stop token {stop_token_id} must be one of the output rows")
        self.stop_only = torch.zeros(self.rows.shape, device=device).masked_fill(~self.is_stop_row, float("-inf"))
        self.stop_token_id = stop_token_id
        self.pad_token_id = pad_token_id
        self.max_cache_len = max_cache_len
        # A static cache where steps are CUDA graphs (fixed shapes); where they run eagerly, an appending one; where
        # they are compiled for CPU, fixed buffers read up to the filled length (`GpaStepCache`).
        self.static_cache = device.type == "cuda" if static_cache is None else static_cache
        if self.static_cache:
            self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        elif self.compiled_on_cpu:
            self.cache = GpaStepCache(model.config, batch_size, max_cache_len, device, model.dtype)
        else:
            self.cache = GpaDecodingCache()
        self.prompts_padded = True  # set by each prefill: over an appending cache, unpadded prompts need no mask
        self.kv_index = torch.arange(max_cache_len, device=device)
        # Static buffers: the graph reads and writes these, and only these.
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # cache slot of the next token
        self.generated = torch.zeros(1, dtype=torch.long, device=device)
        self.padding = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_cache_len, dtype=torch.bool, device=device)
        self.budgets = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, self.rows.numel(), dtype=torch.bool, device=device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # new tokens up to the stop
        self.output = torch.zeros(batch_size, max_cache_len, dtype=torch.long, device=device)

    def refresh_output_rows(self) -> None:
        """Point the step at the current output weights (the model may have been trained since the last request).

        Few allowed rows (TTS / VC): a copy of those rows, refreshed in place (the graph reads this buffer). Most
        rows (ASR): the full layer itself, no copy, and the allowed logits are gathered after it.
        """
        head = self.model.lm_head
        if isinstance(head, GpaAllowedRowsHead):
            raise ValueError("static decoding needs the full output layer, not an allowed-rows head")
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        self.gather_rows = self.rows.numel() > ALLOWED_ROWS_MAX_FRACTION * weight.shape[0]
        if self.gather_rows:  # the layer is called as it is: an int8 `GpaInt8OutputLayer` stays int8
            if head is not self.full_output_layer or self.head.data_ptr() != weight.data_ptr():
                self.clear_graphs()  # a captured graph would call the old layer or read the old storage
            self.full_output_layer, self.head = head, weight
            return
        if self.head.shape != (self.rows.numel(), weight.shape[1]):
            self.head = weight[self.rows].contiguous()
            self.head_bias = None if bias is None else bias[self.rows].contiguous()
            self.clear_graphs()
            return
        self.head.copy_(weight[self.rows])
        if bias is not None:
            self.head_bias.copy_(bias[self.rows])

    def clear_graphs(self) -> None:
        self.step_graph.clear()
        self.prefill_graphs.clear()

    # ---- one step ------------------------------------------------------------------------------------------
    def next_token_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The allowed rows' logits `(batch, rows)` after the processors and warpers `generate` would apply."""
        settings = self.settings
        if settings.repetition_penalty != 1.0:
            penalised = torch.where(
                logits > 0, logits / settings.repetition_penalty, logits * settings.repetition_penalty
            )
            logits = torch.where(self.seen, penalised, logits)
        if settings.min_new_tokens > 0:
            logits = logits.masked_fill((self.generated < settings.min_new_tokens) & self.is_stop_row, float("-inf"))
        logits = torch.where((self.generated >= self.budgets)[:, None], self.stop_only, logits)
        if settings.do_sample:
            logits = logits / settings.temperature
            if 0 < settings.top_k < logits.shape[-1]:
                kth = logits.topk(settings.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if settings.top_p < 1.0:
                ordered, order = logits.sort(dim=-1)
                dropped = ordered.softmax(-1).cumsum(-1) <= 1 - settings.top_p
                dropped = torch.cat([dropped[:, :-1], dropped.new_zeros(dropped.shape[0], 1)], dim=1)  # keep the top
                logits = logits.masked_fill(dropped.scatter(1, order, dropped), float("-inf"))
        return logits

    def select(self, hidden: torch.Tensor, uniform: torch.Tensor | None = None) -> None:
        """Pick each row's next token from the last hidden states `(batch, hidden)`, and record it.

        `uniform`: when sampling, the draw's uniform random numbers `(batch, rows)` (default: drawn here).
        """
        if self.gather_rows:
            logits = self.full_output_layer(hidden).index_select(-1, self.rows)
        else:
            logits = nn.functional.linear(hidden, self.head, self.head_bias)
        scores = self.next_token_scores(logits.float())
        choice = gumbel_max_sample(scores, uniform) if self.settings.do_sample else scores.argmax(-1)
        token = self.rows[choice].masked_fill(self.finished, self.pad_token_id)
        self.lengths.copy_(torch.where(self.finished, self.lengths, self.generated + 1))
        self.finished |= token == self.stop_token_id
        self.seen.scatter_(1, choice[:, None], True)
        self.output.index_copy_(1, self.generated, token[:, None])
        self.token.copy_(token)
        self.generated += 1

    def forward_step(self) -> None:
        """One LM step for the tokens in `self.token`, then `select`."""
        if self.fused_step is not None:
            residual = self.fused_step.residual_stream(
                self.token, self.position - self.padding, self.position, self.valid, self.cache
            )
            uniform = torch.rand(self.seen.shape, device=residual.device) if self.settings.do_sample else None
            self.compiled_tail(residual, uniform)
            return
        if self.static_cache:
            mask = (self.kv_index <= self.position)[None, None, None, :] & self.valid[:, None, None, :]
        else:  # attend over the filled positions only
            length = int(self.position) + 1
            mask = self.valid[:, None, None, :length] if self.prompts_padded else None
            if isinstance(self.cache, GpaStepCache):
                self.cache.point_at(self.position, length)
                if mask is not None:
                    torch._dynamo.maybe_mark_dynamic(mask, 3)
        hidden = self.step_lm(
            input_ids=self.token[:, None],
            attention_mask={"full_attention": mask},  # one query: no causal mask to build
            position_ids=(self.position - self.padding)[:, None],
            use_cache=True,
            **{CACHE_ARGUMENT: self.cache},
        ).last_hidden_state[:, -1]
        self.select(hidden)
        self.position += 1

    def fused_step_tail(self, residual: torch.Tensor, uniform: torch.Tensor | None) -> None:
        """After the fused step's layers: the final norm, `select` and the next position (compiled as one)."""
        self.select(self.fused_step.final_hidden(residual), uniform)
        self.position += 1

    def step(self) -> None:
        if self.model.device.type == "cuda":
            self.step_graph()
        else:
            self.forward_step()

    # ---- a request -----------------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor) -> None:
        """Reset the buffers and the cache, run the prompts (left-padded) and pick the first new tokens."""
        length = input_ids.shape[1]
        if isinstance(self.cache, GpaStepCache):
            self.cache.point_at(self.cache.positions[:length], length)
        else:
            self.cache.reset()
        valid = attention_mask.bool()
        self.valid.fill_(True)  # every slot after the prompt holds a new token
        self.valid[:, :length] = valid
        self.padding.copy_((~valid).sum(-1))
        self.finished.zero_()
        self.lengths.zero_()
        self.generated.zero_()
        self.output.fill_(self.pad_token_id)
        # Repetition penalty covers the prompt too, as in `generate`.
        slots = torch.searchsorted(self.rows, input_ids).clamp(max=self.rows.numel() - 1)
        hits = torch.zeros(self.seen.shape, dtype=torch.long, device=input_ids.device)
        self.seen.copy_(hits.scatter_add_(1, slots, (self.rows[slots] == input_ids).long()) > 0)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        query = torch.arange(length, device=input_ids.device)[:, None]
        # Causal over the real tokens; a padding position sees only itself (a row with nothing to attend to would
        # give NaN, which the next layers' attention would spread even through zero weights).
        mask = (((self.kv_index <= query) & self.valid[:, None, :]) | (self.kv_index == query))[:, None]
        if not self.static_cache:
            self.prompts_padded = not bool(valid.all())
            # transformers builds a causal mask from the cache when given none, which only its own caches can do
            keep_mask = self.prompts_padded or isinstance(self.cache, GpaStepCache)
            mask = mask[..., :length].contiguous() if keep_mask else None
        lm = self.model.model
        if self.compiled_on_cpu:  # the compiled LM, with the prompt's length symbolic: one graph for every prompt
            lm = partial(self.step_lm, prompts=True)
            for tensor, dims in ((input_ids, 1), (positions, 1), (mask, (2, 3))):
                torch._dynamo.mark_dynamic(tensor, dims)
        hidden = lm(
            input_ids=input_ids,
            attention_mask=None if mask is None else {"full_attention": mask},
            position_ids=positions,
            use_cache=True,
            **{CACHE_ARGUMENT: self.cache},
        ).last_hidden_state[:, -1]
        self.select(hidden)
        self.position.fill_(length)

    def decode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        budgets: torch.Tensor,
        max_new_tokens: int,
        streamer: BaseStreamer | None = None,
        sync_every: int | None = None,
    ) -> torch.LongTensor:
        """Prompts + new tokens, finished rows padded with `pad_token_id`, as `generate` returns them.

        The host looks at the new tokens every `sync_every` steps (default: 8, or 1 with a streamer, which then gets
        each token as soon as it exists).
        """
        sync_every = sync_every or (1 if streamer is not None else STATIC_DECODING_SYNC_EVERY)
        steps = self.generate_tokens(input_ids, attention_mask, budgets, max_new_tokens, sync_every, streamer)
        length = sum(new_tokens.shape[1] for new_tokens in steps)
        return torch.cat([input_ids, self.output[:, :length]], dim=1)

    def generate_tokens(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        budgets: torch.Tensor,
        max_new_tokens: int,
        sync_every: int = STATIC_DECODING_SYNC_EVERY,
        streamer: BaseStreamer | None = None,
    ) -> Iterator[torch.LongTensor]:
        """Run one request, yielding its new tokens `(batch, n)` on the host each time the host looks at them.

        A `streamer` gets the prompt, then each new token before it is yielded, and `end()` after the last.

        The steps run in the caller's thread, between two items. That is what a stream needs on CPU, where a
        generation thread of its own (with an OpenMP thread pool of its own) runs every multi-threaded op several
        times slower. Steps after every row has stopped only write padding, which is never yielded, so the tokens do
        not depend on `sync_every`. Work runs in inference mode (per thread, so the cache and buffers are used the
        same way from any caller); between items it is off.
        """
        padding = round_up(input_ids.shape[1], self.prefill_multiple) - input_ids.shape[1]
        prompts = nn.functional.pad(input_ids, (padding, 0), value=self.pad_token_id)
        prompts_mask = nn.functional.pad(attention_mask, (padding, 0), value=0)
        if prompts.shape[1] + max_new_tokens + sync_every > self.max_cache_len:
            raise ValueError(
                f"{prompts.shape[1]} prompt + {max_new_tokens} new tokens exceed the cache ({self.max_cache_len})"
            )
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with torch.inference_mode():
            self.refresh_output_rows()  # the model may have been trained since the last request
            if self.compiled_on_cpu:
                self.step_lm.refresh()
            self.budgets.copy_(budgets)
            if self.model.device.type == "cuda":
                self.prefill_graphs(prompts, prompts_mask)
            else:
                self.prefill(prompts, prompts_mask)
        done, seen = 1, 0
        while True:
            if done % sync_every == 0 or done >= max_new_tokens:
                with torch.inference_mode():
                    all_finished = bool(self.finished.all())
                    end = min(done, int(self.lengths.max())) if all_finished else done
                    new_tokens = self.output[:, seen:end].clone().cpu()
                for column in new_tokens.t() if streamer is not None else ():
                    streamer.put(column)
                yield new_tokens
                seen = end
                if all_finished or done >= max_new_tokens:
                    if streamer is not None:
                        streamer.end()
                    return
            with torch.inference_mode():
                self.step()
            done += 1


# `compile_decoding` value that runs each static decoding step in gpa-hf's fused Triton kernels (`gpu_kernels`).
FUSED_TRITON_STEP = "triton"


def fused_decoding_step(lm: nn.Module, batch_size: int, max_cache_len: int) -> GpaFusedDecodingStep:
    """A [`GpaFusedDecodingStep`] for `lm`; triton is imported only here, where it is asked for."""
    try:
        from .gpu_kernels import GpaFusedDecodingStep
    except ImportError as error:
        raise ImportError(
            f"compile_decoding={FUSED_TRITON_STEP!r} needs the triton package (CUDA builds of torch bring it): {error}"
        ) from error
    return GpaFusedDecodingStep(lm, batch_size, max_cache_len)


class GpaStaticDecoderCache(OrderedDict):
    """The last `size` decoders of a model, by shape and settings (each holds a KV cache and a CUDA graph), and the
    model's compiled CPU steps, which its decoders share."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.size = size
        self.compiled_cpu_steps: dict[str | None, GpaCompiledCpuStep] = {}

    def clear(self) -> None:
        super().clear()
        self.compiled_cpu_steps.clear()

    def get_or_create(self, key: tuple, create: Callable[[], GpaStaticDecoder]) -> GpaStaticDecoder:
        if key in self:
            self.move_to_end(key)
            return self[key]
        while len(self) >= self.size:
            self.popitem(last=False)
        self[key] = decoder = create()
        return decoder


# Below this share of allowed rows, computing only those rows pays off (ASR allows ~85% of them: not worth it).
ALLOWED_ROWS_MAX_FRACTION = 0.5

# Static decoding on CUDA pads prompts to a multiple of this many tokens: one prefill graph serves similar lengths.
CUDA_PREFILL_MULTIPLE = 32


def prefill_multiple_for(device: torch.device) -> int:
    """Prompt-length multiple of static decoding: CUDA replays a graph per length; CPU runs prompts unpadded."""
    return CUDA_PREFILL_MULTIPLE if torch.device(device).type == "cuda" else 1


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value` (padded prompt and cache lengths)."""
    return -(-value // multiple) * multiple


# Token counts the codec's CUDA graphs are captured for (up to 30 s of audio); outputs are padded up to the next.
# Steps of at most 1.5x: padding costs the GPU little next to launching the decoder's kernels one by one.
CODEC_GRAPH_FRAMES = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)


def codec_graph_frames(frames: int) -> int | None:
    """The graph length that holds `frames` semantic tokens, or None past the longest (decoded without a graph)."""
    return next((size for size in CODEC_GRAPH_FRAMES if size >= frames), None)


__all__ = [
    "ALLOWED_ROWS_MAX_FRACTION",
    "CACHE_GROWTH",
    "CODEC_GRAPH_FRAMES",
    "CUDA_PREFILL_MULTIPLE",
    "FUSED_TRITON_STEP",
    "STATIC_DECODING_SYNC_EVERY",
    "TASK_GENERATION_DEFAULTS",
    "GpaAllowedRowsHead",
    "GpaAppendingCacheLayer",
    "GpaAudioStreamer",
    "GpaCudaGraphs",
    "GpaDecodingCache",
    "GpaStaticDecoder",
    "GpaStaticDecoderCache",
    "GpaTaskLogitsProcessor",
    "StaticDecodingSettings",
    "allowed_token_mask",
    "build_generation_config",
    "codec_graph_frames",
    "gumbel_max_sample",
    "length_budget",
    "prefill_multiple_for",
]
