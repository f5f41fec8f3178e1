"""GPA: one Qwen3 decoder for text-to-speech, speech recognition and voice conversion.

The LM is transformers' own `Qwen3ForCausalLM` (same weights and key names as the published checkpoint, any
attention backend); the two audio tokenizers are submodules kept in float32. `generate` tokenizes the audio the
processor prepared, writes the codes into the prompt, applies the task's defaults, output constraint and length
budget, and can decode the result to audio.
"""

import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, Qwen3ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3MLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import ModelOutput

from .configuration_gpa import GpaConfig
from .cpu_kernels import MIN_CACHE_WIDTH, cache_width, load_cpu_kernels, one_query_attention_supported
from .generation_gpa import (
    ALLOWED_ROWS_MAX_FRACTION,
    CACHE_ARGUMENT,
    STATIC_DECODING_SYNC_EVERY,
    GpaAllowedRowsHead,
    GpaAudioStreamer,
    GpaCudaGraphs,
    GpaDecodingCache,
    GpaStaticDecoder,
    GpaStaticDecoderCache,
    GpaStreamCancelled,
    GpaTaskLogitsProcessor,
    StaticDecodingSettings,
    allowed_token_mask,
    codec_graph_frames,
    length_budget,
    prefill_multiple_for,
    round_up,
)
from .modeling_bicodec import BiCodecModel, harmonic_frame_phases
from .modeling_glm_speech_tokenizer import GlmSpeechTokenizerModel
from .processing_gpa import AUDIO_INPUT_NAMES, GLM_PLACEHOLDER, GLOBAL_PLACEHOLDER, SEMANTIC_PLACEHOLDER, GpaVoice

# oneDNN's CPU bfloat16 convolution returns wrong results (relative error ~1) for some layers with fewer input
# channels per group than this and long kernels (measured with torch 2.13 on an AMX-capable Xeon: 2-12 channels
# with kernels of 16 or more; e.g. gpa-tiny's wav2vec2 positional convolution, 12 channels per group, kernel 32).
# Such layers are cheap, so all of them run in float32.
BFLOAT16_CPU_CONV_MIN_CHANNELS_PER_GROUP = 16

# Dynamic int8 with one weight scale per output row: as fast as one per tensor (fbgemm, 2 cores), closer to float32
# (relative error of the last hidden states: gpa-tiny 4.4% against 4.6%, published size with random weights 5.9%
# against 6.6%), and a fused layer's rows quantize as those of its parts would.
INT8_QCONFIG = torch.ao.quantization.per_channel_dynamic_qconfig


# ASR's two audio tokenizers run side by side on CPU (`run_side_by_side_on_cpu`) when both encoders have at least
# this many parameters. The published ones (wav2vec2 215M, GLM 343M) take about as long as each other and gain (2
# cores, 4 s clip: 1.24 s against 1.45 s one after the other); small ones such as gpa-tiny's (0.4M each) use a second
# thread well and are unbalanced (its semantic path takes 4x the GLM tokenizer's time), so they lose (batch of 16:
# 96 ms against 78 ms) and run one after the other.
SIDE_BY_SIDE_MIN_ENCODER_PARAMETERS = 10_000_000


def warn_at_caller(message: str) -> None:
    """`warnings.warn` pointing at the first frame outside gpa-hf, torch and transformers: `generate` is reached
    through decorators and pipelines, and a fixed `stacklevel` would name one of their files instead of the user's."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: the frame that called this function
    libraries = {"gpa_hf", "torch", "transformers"}
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in libraries:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def run_side_by_side_on_cpu(jobs: list[Callable[[], object]]) -> list[object]:
    """Run independent CPU jobs at the same time, the caller's intra-op threads shared out among them.

    A second thread makes each published-size audio encoder only 1.75x faster: on 2 cores, BiCodec's semantic path
    and the GLM tokenizer of a 4 s clip take 1.24 s each on one thread and 0.71 s each on two, so ASR's two
    tokenizations take 1.45 s one after the other and 1.24 s side by side. Grad and inference mode are per thread:
    each job runs in the caller's. Under CPU autocast (also per thread), or with one thread or one job, the jobs
    run one after the other in the caller's thread.
    """
    threads = torch.get_num_threads()
    if len(jobs) < 2 or threads < 2 or torch.is_autocast_enabled("cpu"):
        return [job() for job in jobs]
    workers = min(len(jobs), threads)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(job: Callable[[], object]) -> object:
        torch.set_num_threads(threads // workers)  # this worker thread's count; the caller's stays as it is
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return job()

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        return [future.result() for future in futures]


def cast_audio_tokenizer(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast an audio tokenizer (BiCodec, the GLM tokenizer) to `dtype`, in place, with a float32 guard on CPU.

    On CPU, reduced-precision casts keep every convolution with fewer than
    `BFLOAT16_CPU_CONV_MIN_CHANNELS_PER_GROUP` input channels per group in float32: its input is cast up and its
    output back to `dtype`. Casting back to float32 removes the guard.
    """
    for handle in getattr(module, "float32_convolution_hooks", []):
        handle.remove()
    module.to(dtype)
    module.float32_convolution_hooks = []
    if dtype == torch.float32 or next(module.parameters()).device.type != "cpu":
        return module
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and (
            layer.in_channels // layer.groups < BFLOAT16_CPU_CONV_MIN_CHANNELS_PER_GROUP
        ):
            layer.float()
            module.float32_convolution_hooks += [
                layer.register_forward_pre_hook(lambda _, inputs: tuple(value.float() for value in inputs)),
                layer.register_forward_hook(lambda _, inputs, output: output.to(dtype)),
            ]
    return module


@dataclass
class GpaGenerateOutput(ModelOutput):
    """
    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, length)`): prompts (audio codes filled in) + new tokens.
        audio (`list[torch.FloatTensor]`): for TTS / VC with `output_audio=True`, one 16 kHz waveform per item,
            trimmed to its own length (empty where no audio token was produced).
    """

    sequences: torch.LongTensor | None = None
    audio: list[torch.FloatTensor] | None = None


class GpaInt8OutputLayer(torch.nn.Module):
    """An output layer whose logits come from a dynamic int8 copy of its weight (CPU inference).

    A step that may emit most rows (ASR: all text tokens) reads the whole output layer: at published size 370 MB
    in float32, 92 MB in int8 (about 35 ms against 4 ms per token on 2 cores). The float32 `weight` is kept: it
    stays tied to the input embeddings, and constrained decoding copies its allowed rows from it, so TTS / VC
    logits are unchanged.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        source = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        source.weight, source.bias = self.weight, self.bias
        source.qconfig = INT8_QCONFIG
        self.quantized = torch.ao.nn.quantized.dynamic.Linear.from_float(source)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.quantized(hidden_states)


def fuse_linear_layers(module: torch.nn.Module, fused_name: str, names: tuple[str, ...]) -> list[int]:
    """Replace `module`'s linear layers `names` (same input) by one, `fused_name`; returns their output sizes.

    `state_dict` still names the original layers (the fused parameters are split back into copies), and
    `load_state_dict` accepts them, so checkpoints keep the published key names.
    """
    layers = [getattr(module, name) for name in names]
    if any(type(layer) is not torch.nn.Linear for layer in layers):
        found = ", ".join(
            f"{name}: {type(layer).__module__}.{type(layer).__name__}" for name, layer in zip(names, layers)
        )
        raise ValueError(f"can only fuse float nn.Linear layers (fuse before quantizing); found {found}")
    if len({layer.bias is None for layer in layers}) != 1:
        raise ValueError(f"can only fuse linear layers that all have a bias or none; {', '.join(names)} do not")
    parameters = ("weight",) if layers[0].bias is None else ("weight", "bias")
    sizes = [layer.out_features for layer in layers]
    fused = torch.nn.Linear(layers[0].in_features, sum(sizes), bias=len(parameters) == 2, device="meta")
    for parameter in parameters:
        value = torch.cat([getattr(layer, parameter).detach() for layer in layers])
        requires_grad = getattr(layers[0], parameter).requires_grad
        setattr(fused, parameter, torch.nn.Parameter(value, requires_grad=requires_grad))
    for name in names:
        delattr(module, name)
    module.add_module(fused_name, fused)

    def split(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for parameter in parameters:
            key = f"{prefix}{fused_name}.{parameter}"
            if key in state_dict:  # absent once the fused layer is quantized (its packed weight cannot be split)
                for name, part in zip(names, state_dict.pop(key).split(sizes)):
                    state_dict[f"{prefix}{name}.{parameter}"] = part.clone()  # views of one storage would not save

    def join(module: torch.nn.Module, state_dict: dict, prefix: str, *args) -> None:
        for parameter in parameters:
            keys = [f"{prefix}{name}.{parameter}" for name in names]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}{fused_name}.{parameter}"] = torch.cat([state_dict.pop(key) for key in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)
    return sizes


def one_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention for one query per sequence `(batch, heads, 1, dim)`, its heads grouped by key-value head: `(batch,
    1, heads * dim)`.

    Each key-value head's queries attend as a short sequence, so keys and values are neither repeated nor run through
    SDPA's `enable_gqa`. transformers groups them so eagerly, but not under `torch.compile`, where it repeats the
    keys and values (masked) or uses `enable_gqa` (unmasked): 2 CPU cores, batch 8, 290 cached positions, 28
    layers: 130 ms and 62 ms against 56 ms grouped. Where gpa-hf's CPU kernel is loaded (`fuse_projections` on CPU),
    it attends instead of SDPA: it reads each cached row once, at memory speed (see `cpu_kernels`). `mask`, if any,
    is shared by the heads: `(batch, 1, 1, positions)`.
    """
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    if one_query_attention_supported(query, key, mask):
        output = torch.ops.gpa_hf.one_query_attention(grouped.float(), key, value, mask, scaling).to(query.dtype)
    else:
        output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, 1, heads * dim)


class GpaFusedAttention(Qwen3Attention):
    """Qwen3 attention whose query, key and value projections are one linear layer (`qkv_proj`).

    A decoding step multiplies a token or two per sequence by every weight, so it is a chain of small products whose
    count matters as much as their size: one product instead of three (and one activation quantization for int8)
    takes a published-size CPU int8 step's projection products from ~24 to ~19 ms (2 cores, batch 1), and a compiled
    H100 step from 544 kernels to 453. Same computation otherwise (the stock Qwen3 forward, its three outputs split).
    """

    @classmethod
    def from_attention(cls, attention: Qwen3Attention) -> "GpaFusedAttention":
        with torch.device("meta"):
            fused = cls(attention.config, attention.layer_idx)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            setattr(fused, name, getattr(attention, name))
        fused.projection_sizes = fuse_linear_layers(fused, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
        return fused.train(attention.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = kwargs.pop(CACHE_ARGUMENT, None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.qkv_proj(hidden_states).split(self.projection_sizes, dim=-1)
        query = self.q_norm(query.view(hidden_shape)).transpose(1, 2)
        key = self.k_norm(key.view(hidden_shape)).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        one_query = query.shape[2] == 1 and query.device.type == "cpu" and self.config._attn_implementation == "sdpa"
        # Measured on CPU only (CUDA steps keep transformers' path): compiled, grouped queries; eagerly, the kernel.
        if one_query and (torch.compiler.is_compiling() or one_query_attention_supported(query, key, attention_mask)):
            return self.o_proj(one_query_attention(query, key, value, attention_mask, self.scaling)), None
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class GpaFusedMLP(Qwen3MLP):
    """Qwen3's gated MLP with the gate and up projections as one linear layer (`gate_up_proj`); see
    [`GpaFusedAttention`] for why."""

    @classmethod
    def from_mlp(cls, mlp: Qwen3MLP) -> "GpaFusedMLP":
        with torch.device("meta"):
            fused = cls(mlp.config)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(fused, name, getattr(mlp, name))
        fuse_linear_layers(fused, "gate_up_proj", ("gate_proj", "up_proj"))
        return fused.train(mlp.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class GpaForConditionalGeneration(Qwen3ForCausalLM):
    config: GpaConfig
    # Audio tokenizers are not part of the LM; they stay float32 whatever dtype the LM is loaded in.
    _keep_in_fp32_modules_strict = ["bicodec", "speech_tokenizer"]

    def __init__(self, config: GpaConfig):
        super().__init__(config)
        if config._attn_implementation not in (None, "eager", "sdpa"):
            # Flash kernels need half precision; the audio tokenizers run in float32, so they use SDPA.
            config.bicodec_config._attn_implementation = "sdpa"
            config.speech_tokenizer_config._attn_implementation = "sdpa"
        config.bicodec_config.include_semantic_encoder = config.needs_audio_encoders
        self.bicodec = BiCodecModel(config.bicodec_config)
        self.speech_tokenizer = (
            GlmSpeechTokenizerModel(config.speech_tokenizer_config) if "asr" in config.tasks else None
        )
        if "asr" not in config.tasks:
            self._keys_to_ignore_on_load_unexpected = [r"^speech_tokenizer\."]
        self.post_init()
        # post_init adds the audio tokenizers' own lists, whose names ("layers", "encoder"...) would match the LM's
        # parameters too (`model.layers.*`) and keep the whole LM float32: the tokenizers as a whole are what stays.
        self._keep_in_fp32_modules_strict = set(type(self)._keep_in_fp32_modules_strict)
        self.static_decoders = GpaStaticDecoderCache()
        self.codec_graphs = GpaCudaGraphs(self.bicodec.decode_without_checks)
        if not config.needs_audio_encoders:
            self._keys_to_ignore_on_load_unexpected.update([r"^bicodec\.semantic_model\.", r"^bicodec\.encoder\."])

    # ---- audio -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def create_voice(self, reference_values: torch.Tensor) -> list[GpaVoice]:
        """Voices (global tokens) of speaker reference clips from `processor.feature_extractor.reference_features`."""
        codes = self.bicodec.encode_speaker(reference_values.to(self.device)).global_codes
        return [GpaVoice(c.cpu(), self.config.bicodec_config.global_codebook_size) for c in codes]

    @torch.no_grad()
    def audio_token_ids(
        self,
        source_values: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        glm_input_features: torch.Tensor | None = None,
        glm_attention_mask: torch.Tensor | None = None,
        glm_audio_index: torch.LongTensor | None = None,
        reference_values: torch.Tensor | None = None,
    ) -> dict[int, list[torch.LongTensor]]:
        """Tokenize the processor's audio features into vocabulary ids, one tensor per clip.

        Returns a dict keyed by placeholder kind (`SEMANTIC_PLACEHOLDER`, `GLM_PLACEHOLDER`, `GLOBAL_PLACEHOLDER`)
        holding the ids of whichever inputs were given.
        """
        layout = self.config.layout
        jobs: dict[int, Callable[[], list[torch.Tensor]]] = {}
        if source_values is not None:
            if self.bicodec.semantic_model is None:
                raise ValueError(
                    "this model was loaded without the audio encoders (tasks=['tts']); reload with asr/vc"
                )

            def semantic_ids() -> list[torch.Tensor]:
                mask = None if source_attention_mask is None else source_attention_mask.to(self.device)
                encoded = self.bicodec.encode(source_values.to(self.device), mask)
                codes = zip(encoded.semantic_codes, encoded.semantic_lengths)
                return [c[:n] + layout.semantic_offset for c, n in codes]

            jobs[SEMANTIC_PLACEHOLDER] = semantic_ids
        if glm_input_features is not None:
            if self.speech_tokenizer is None:
                raise ValueError("this model was loaded without the GLM speech tokenizer (tasks without 'asr')")

            def glm_ids() -> list[torch.Tensor]:
                mask = None if glm_attention_mask is None else glm_attention_mask.to(self.device)
                encoded = self.speech_tokenizer.encode(glm_input_features.to(self.device), mask, glm_audio_index)
                return [c[:n] + layout.glm_offset for c, n in zip(encoded.audio_codes, encoded.code_lengths)]

            jobs[GLM_PLACEHOLDER] = glm_ids
        if len(jobs) > 1 and self.audio_encoders_run_side_by_side():
            ids = dict(zip(jobs, run_side_by_side_on_cpu(list(jobs.values()))))
        else:
            ids = {kind: job() for kind, job in jobs.items()}
        if reference_values is not None:  # the speaker path: a small share of the semantic path's time
            encoded = self.bicodec.encode_speaker(reference_values.to(self.device))
            ids[GLOBAL_PLACEHOLDER] = list(encoded.global_codes + layout.global_offset)
        return ids

    def audio_encoders_run_side_by_side(self) -> bool:
        """Whether `audio_token_ids` runs the semantic path and the GLM tokenizer side by side: on CPU, when both
        encoders are large (`SIDE_BY_SIDE_MIN_ENCODER_PARAMETERS`)."""
        encoders = (self.bicodec.semantic_model, self.speech_tokenizer)
        if self.device.type != "cpu" or any(encoder is None for encoder in encoders):
            return False
        return min(encoder.num_parameters() for encoder in encoders) >= SIDE_BY_SIDE_MIN_ENCODER_PARAMETERS

    @torch.no_grad()
    def fill_audio_tokens(
        self,
        input_ids: torch.LongTensor,
        audio_input_mask: torch.LongTensor | None = None,
        **audio_inputs: torch.Tensor,
    ) -> torch.LongTensor:
        """Tokenize the processor's audio features (`AUDIO_INPUT_NAMES`) and write the ids into the placeholders."""
        if audio_input_mask is None or not audio_input_mask.any():
            return input_ids
        unknown = set(audio_inputs) - set(AUDIO_INPUT_NAMES)
        if unknown:
            raise TypeError(f"unexpected audio inputs {sorted(unknown)}: expected some of {list(AUDIO_INPUT_NAMES)}")
        audio_input_mask = audio_input_mask.to(input_ids.device)
        for kind, name in (
            (SEMANTIC_PLACEHOLDER, "source_values"),
            (GLM_PLACEHOLDER, "glm_input_features"),
            (GLOBAL_PLACEHOLDER, "reference_values"),
        ):
            if (audio_input_mask == kind).any() and audio_inputs.get(name) is None:
                raise ValueError(f"the prompt has placeholders of kind {kind} but no {name} were given")
        codes = self.audio_token_ids(**audio_inputs)
        input_ids = input_ids.clone()
        for kind, per_item in codes.items():
            rows = [row for row in range(input_ids.shape[0]) if (audio_input_mask[row] == kind).any()]
            if len(rows) != len(per_item):
                raise ValueError(
                    f"{len(rows)} prompts need audio of kind {kind}, but {len(per_item)} clips were given"
                )
            for row, values in zip(rows, per_item):
                positions = (audio_input_mask[row] == kind).nonzero().squeeze(-1)
                if positions.numel() != values.numel():
                    raise ValueError(
                        f"prompt {row}: {positions.numel()} placeholders of kind {kind}, {values.numel()} codes"
                    )
                input_ids[row, positions] = values.to(input_ids.device)
        return input_ids

    def infer_task(self, input_ids: torch.LongTensor) -> str:
        """The task a prompt encodes: GLM tokens -> ASR; voice + source semantic tokens -> VC; voice alone -> TTS."""
        layout = self.config.layout
        first = input_ids[0]
        if (first == layout.start_glm).any():
            return "asr"
        if (first == layout.start_semantic).any():
            return "vc"
        return "tts"

    @torch.no_grad()
    def synthesize(
        self,
        semantic_codes: torch.LongTensor,
        global_codes: torch.LongTensor,
        semantic_lengths: torch.LongTensor,
        cuda_graphs: bool = False,
        initial_phase: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Audio `(batch, frames * hop)` of semantic tokens this model generated (valid ids: not checked again).

        `initial_phase`: the codec's harmonic phase at the first token (a window that continues a stream).

        With `cuda_graphs` on a CUDA device, the codec runs as a CUDA graph captured per batch size and length
        (padded up to one of `CODEC_GRAPH_FRAMES`; the mask keeps the padding out of every item's audio): the
        decoder is hundreds of short kernels, which the GPU otherwise waits on Python to launch.
        """
        frames = semantic_codes.shape[1]
        graph_frames = codec_graph_frames(frames)
        if not cuda_graphs or self.device.type != "cuda" or graph_frames is None:
            return self.bicodec.decode_without_checks(semantic_codes, global_codes, semantic_lengths, initial_phase)
        padded = torch.nn.functional.pad(semantic_codes, (0, graph_frames - frames))
        # A graph reads the weights where they were at capture: a codec moved or cast since needs a new one.
        storage = tuple(tensor.data_ptr() for tensor in self.bicodec.parameters())
        phase = () if initial_phase is None else (initial_phase,)
        audio = self.codec_graphs(padded, global_codes, semantic_lengths, *phase, version=storage)
        return audio[:, : frames * self.config.bicodec_config.hop_length]

    @torch.no_grad()
    def decode_audio(
        self, sequences: torch.LongTensor, prompt_length: int, cuda_graphs: bool = False
    ) -> list[torch.Tensor]:
        """Waveforms of the semantic tokens generated after `prompt_length`, voiced by each prompt's global tokens.

        `cuda_graphs`: decode with [`synthesize`]'s CUDA graphs (on a CUDA device).
        """
        layout = self.config.layout
        semantic, voices = [], []
        for sequence in sequences:
            prompt, new = sequence[:prompt_length], sequence[prompt_length:]
            stops = (new == layout.stop).nonzero()
            new = new[: stops[0, 0]] if stops.numel() else new
            semantic.append(layout.block_codes(new, "semantic"))
            voices.append(layout.block_codes(prompt, "global"))
        lengths = [codes.numel() for codes in semantic]
        empty = [row for row, length in enumerate(lengths) if not length]
        if empty:
            warn_at_caller(f"requests {empty} produced no audio tokens; their waveforms are empty")
        hop = self.config.bicodec_config.hop_length
        waveforms = [torch.zeros(0) for _ in semantic]
        # One codec call for the batch: on CPU the wave generator decodes each item to its own length anyway.
        rows = [row for row, length in enumerate(lengths) if length]
        if rows:
            padded = torch.nn.utils.rnn.pad_sequence([semantic[row] for row in rows], batch_first=True)
            row_lengths = torch.tensor([lengths[row] for row in rows], device=sequences.device)
            voice = torch.stack([voices[row] for row in rows])
            audio = self.synthesize(padded, voice, row_lengths, cuda_graphs)
            for row, item in zip(rows, audio):
                waveforms[row] = item[: lengths[row] * hop].float().cpu()
        return waveforms

    # ---- generation ------------------------------------------------------------------------------------
    def fuse_projections(self) -> "GpaForConditionalGeneration":
        """Give every decoder layer one query-key-value and one gate-up linear layer, in place; returns the model.

        Seven products per layer become four (`GpaFusedAttention`, `GpaFusedMLP`): same values up to float
        rounding, fewer and larger products per decoding step on CPU and GPU. `state_dict` and `save_pretrained`
        keep the published key names and the fused layers still train; adapters that name `q_proj` & co. (PEFT)
        need an unfused model. Do it before `quantize_lm_dynamic_int8` (which does it itself) or `torch.compile`.
        On CPU it also loads gpa-hf's attention kernel for the decoding steps (`cpu_kernels`; built on first use),
        where the LM's KV cache is wide enough for it to matter (`MIN_CACHE_WIDTH`: the published LM, not gpa-tiny).
        """
        if self.device.type == "cpu" and cache_width(self.config) >= MIN_CACHE_WIDTH:
            load_cpu_kernels()  # the fused attention's one-token steps (`one_query_attention`)
        for layer in self.model.layers:
            if not isinstance(layer.self_attn, GpaFusedAttention):
                layer.self_attn = GpaFusedAttention.from_attention(layer.self_attn)
            if not isinstance(layer.mlp, GpaFusedMLP):
                layer.mlp = GpaFusedMLP.from_mlp(layer.mlp)
        self.static_decoders.clear()  # their compiled steps and graphs call the old layers
        return self

    def quantize_lm_dynamic_int8(self) -> "GpaForConditionalGeneration":
        """Make the LM dynamic int8 for CPU inference, in place; returns the model.

        Decoding one request reads every LM weight per token, so on CPU it is memory-bound: int8 weights make a
        published-size decoding step about 3x faster than float32. The decoder layers' linear layers, fused first
        (`fuse_projections`), become int8 with one scale per output row, so a fused layer quantizes exactly as its
        parts would. When the model serves ASR, whose steps may emit most rows and so read the whole output layer,
        that layer gets an int8 copy too (`GpaInt8OutputLayer`); TTS / VC steps keep reading their few rows in
        float32. The embeddings and both audio tokenizers stay float32.
        """
        if self.device.type != "cpu":
            raise ValueError(f"dynamic int8 quantization runs on CPU; this model is on {self.device}")
        self.fuse_projections()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
            self.model.layers = torch.ao.quantization.quantize_dynamic(
                self.model.layers, {torch.nn.Linear: INT8_QCONFIG}, dtype=torch.qint8
            )
            if "asr" in self.config.tasks and not isinstance(self.lm_head, GpaInt8OutputLayer):
                self.lm_head = GpaInt8OutputLayer(self.lm_head)
        return self

    def cast_audio_tokenizers(self, dtype: torch.dtype) -> "GpaForConditionalGeneration":
        """Run BiCodec and the GLM tokenizer in `dtype`, in place; returns the model.

        They load in float32 whatever the LM's dtype, which keeps their tokens and audio exact. Their convolutions
        and encoder layers are compute-bound, so on CPUs with bfloat16 dot products (AVX512-BF16) bfloat16 runs them
        about 2x faster, which matters most for ASR (two encoders per request) and batched TTS (the wave
        generator). The price: tokens and waveforms are no longer those of float32 (see the README's performance
        section for what changes on gpa-tiny). On CPU, convolutions with few input channels per group stay float32
        (see [`cast_audio_tokenizer`]).
        """
        for module in (self.bicodec, self.speech_tokenizer):
            if module is not None:
                cast_audio_tokenizer(module, dtype)
        return self

    @contextmanager
    def allowed_rows_output(self, allowed: torch.BoolTensor) -> Iterator[None]:
        """Within this block, the output layer computes only the `allowed` rows (others are -inf).

        Used by `generate` when a task constrains its output; do not train inside it.
        """
        if allowed.float().mean() > ALLOWED_ROWS_MAX_FRACTION:
            yield
            return
        full_head = self.lm_head
        self.lm_head = GpaAllowedRowsHead(full_head, allowed)
        try:
            yield
        finally:
            self.lm_head = full_head

    def task_generation_config(self, task: str, generation_config: GenerationConfig | None, **kwargs) -> dict:
        """The task's saved defaults, overridden by the caller's generation config, then by explicit kwargs."""
        base = generation_config or self.generation_config
        defaults = dict(getattr(self.generation_config, "task_defaults", {}).get(task, {}))
        if generation_config is not None:
            defaults.update(generation_config.to_diff_dict())
        defaults.update(kwargs)
        values = {**base.to_dict(), **defaults, "task_defaults": None}
        if not values.get("do_sample", False):  # greedy: sampling settings of other tasks do not apply
            values.update(temperature=None, top_k=None, top_p=None)
        return GenerationConfig(**values)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        audio_input_mask: torch.LongTensor | None = None,
        task: str | None = None,
        output_audio: bool = False,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer=None,
        restrict_output: bool = True,
        static_decoding: bool = False,
        compile_decoding: bool | str = False,
        **kwargs,
    ):
        """Generate for a prompt from [`GpaProcessor`]; `generate` kwargs (sampling, `max_new_tokens`...) pass through.

        Args:
            audio_input_mask: the processor's placeholder map; the audio features it names (`source_values`,
                `glm_input_features`, `reference_values`, ...) come in `kwargs` as the processor returned them.
            task: `"tts"`, `"asr"` or `"vc"`; inferred from the prompt when omitted.
            output_audio: for TTS / VC, return a [`GpaGenerateOutput`] with decoded waveforms.
            streamer: a `transformers` streamer; it receives the new token ids as they are generated.
            restrict_output: compute logits only for the rows the task may emit (TTS / VC); same outputs, faster.
            static_decoding: decode with [`GpaStaticDecoder`] (static KV cache; on CUDA the prompt and each step
                are CUDA graph replays, several times faster than `generate` for this small LM, and so is the
                decoding to audio, see [`synthesize`]). Greedy decoding gives the same tokens; sampling draws from
                the same distribution. Supports the sampling settings GPA's tasks use (temperature, top_k, top_p,
                repetition_penalty, min_new_tokens) and raises for others.
            compile_decoding: with `static_decoding`, compile the decoding step with `torch.compile` (fewer, fused
                kernels per step; the first request of a shape pays the compilation). On CPU the step becomes one
                graph and the prompts' pass another ([`GpaCompiledCpuStep`]), and an int8 LM
                (`quantize_lm_dynamic_int8`) runs its layers' own packed products in them ([`GpaPackedInt8Linear`]).
                A string is the `torch.compile` mode, e.g. `"max-autotune-no-cudagraphs"`, or `"triton"`: on GPU,
                each step runs gpa-hf's fused Triton kernels instead ([`GpaFusedDecodingStep`], six a layer; the
                fastest there: 0.47 ms a published-size step on an H200, against 1.39 ms with `torch.compile`).
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (build them with GpaProcessor)")
        request = self.prepare_request(input_ids, attention_mask, audio_input_mask, task, generation_config, kwargs)
        input_ids, attention_mask, task, budgets, config = request
        if output_audio and task == "asr":
            raise ValueError("output_audio=True is for tts and vc; ASR returns text ids")
        if static_decoding:
            if logits_processor:
                raise ValueError("static_decoding does not run extra logits processors; use generate without it")
            decoder = self.static_decoder(input_ids, task, config, compile_decoding)
            outputs = decoder.decode(input_ids, attention_mask, budgets, config.max_new_tokens, streamer)
        else:
            layout = self.config.layout
            allowed = allowed_token_mask(task, layout, self.config.vocab_size)
            processors = LogitsProcessorList(logits_processor or [])
            processors.append(GpaTaskLogitsProcessor(allowed, layout.stop, input_ids.shape[1], budgets))
            # Unless a cache implementation is asked for ("dynamic" is the stock one), decode with one that appends
            # in place.
            cache = (
                {CACHE_ARGUMENT: GpaDecodingCache()}
                if config.use_cache is not False and not config.cache_implementation
                else {}
            )
            with self.allowed_rows_output(allowed) if restrict_output else nullcontext():
                outputs = super().generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=processors,
                    streamer=streamer,
                    **cache,
                )
        if not output_audio:
            return outputs
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        audio = self.decode_audio(sequences, input_ids.shape[1], cuda_graphs=static_decoding)
        return GpaGenerateOutput(sequences=sequences, audio=audio)

    def prepare_request(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None,
        audio_input_mask: torch.LongTensor | None,
        task: str | None,
        generation_config: GenerationConfig | None,
        kwargs: dict,
    ) -> tuple[torch.LongTensor, torch.LongTensor, str, torch.LongTensor, GenerationConfig]:
        """Prompts with their audio codes filled in, their mask, the task, each prompt's length budget and the
        generation config (task defaults, then `kwargs`). Takes the audio inputs out of `kwargs`."""
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        audio_inputs = {name: kwargs.pop(name) for name in AUDIO_INPUT_NAMES if name in kwargs}
        input_ids = self.fill_audio_tokens(input_ids, audio_input_mask, **audio_inputs)
        task = task or self.infer_task(input_ids)
        layout = self.config.layout
        budgets = length_budget(task, layout, input_ids, attention_mask)
        if kwargs.get("max_new_tokens") is not None:
            budgets = budgets.clamp(max=kwargs["max_new_tokens"])
        config = self.task_generation_config(task, generation_config, **kwargs)
        config.max_new_tokens = int(budgets.max()) + 1
        config.eos_token_id = layout.stop
        return input_ids, attention_mask, task, budgets.to(self.device), config

    def static_decoder(
        self, input_ids: torch.LongTensor, task: str, config: GenerationConfig, compile_step: bool | str = False
    ) -> GpaStaticDecoder:
        """`generate`'s `static_decoding=True` decoder for these prompts: reused (or built) for their shape."""
        settings = StaticDecodingSettings.from_generation_config(config)
        # Cache lengths in steps of 256, so that requests of similar length share one decoder and its graph; the
        # margin holds the steps run past the end before the host looks.
        prompt_length = round_up(input_ids.shape[1], prefill_multiple_for(self.device))
        max_cache_len = round_up(prompt_length + config.max_new_tokens + STATIC_DECODING_SYNC_EVERY, 256)
        pad = config.pad_token_id if config.pad_token_id is not None else self.config.layout.stop
        key = (task, input_ids.shape[0], max_cache_len, settings, pad, compile_step, self.device, self.dtype)

        def create() -> GpaStaticDecoder:
            allowed = allowed_token_mask(task, self.config.layout, self.config.vocab_size)
            rows = allowed[: self.config.vocab_size].nonzero().squeeze(-1)
            return GpaStaticDecoder(
                self, rows, self.config.layout.stop, pad, input_ids.shape[0], max_cache_len, settings, compile_step
            )

        return self.static_decoders.get_or_create(key, create)

    # ---- streaming -------------------------------------------------------------------------------------
    def generate_stream(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        audio_input_mask: torch.LongTensor | None = None,
        first_chunk_tokens: int = 4,
        chunk_tokens: int = 50,
        left_context: int = 24,
        right_context: int = 16,
        **kwargs,
    ) -> Iterator[torch.Tensor]:
        """Text-to-speech or voice conversion of one prompt, yielding 16 kHz audio chunks while the LM generates.

        Chunks are decoded between LM steps, in the generating thread (see [`GpaAudioStreamer`]). Each chunk is
        decoded from a window of semantic tokens with `left_context` tokens before it and
        `right_context` after it, so that the joined chunks equal the waveform of one decode of all tokens (the
        decoder's influence falls below -100 dB within 20 tokens), with no sample repeated or missing. The first
        chunk covers `first_chunk_tokens` tokens, for a short time to first audio; later chunks `chunk_tokens`.
        Other kwargs (sampling settings, `max_new_tokens`, `task`, the processor's audio features) go to
        `generate`. Stopping early (`break`, `close()`) stops the generation too, at its next step.

        Streams use static decoding unless `static_decoding=False`: its steps run in the caller's thread, between
        the chunks this yields (see [`GpaStaticDecoder.generate_tokens`]), which on CPU makes the first chunk come
        about 40% sooner than from `generate` in a thread of its own (the path `static_decoding=False` takes, for
        extra logits processors or settings static decoding does not support).
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate_stream takes one prompt, got a batch of {input_ids.shape[0]}")
        if min(first_chunk_tokens, chunk_tokens) < 1 or min(left_context, right_context) < 0:
            raise ValueError("chunk sizes must be >= 1 and contexts >= 0")
        audio_inputs = {name: kwargs.pop(name) for name in AUDIO_INPUT_NAMES if name in kwargs}
        input_ids = self.fill_audio_tokens(input_ids.to(self.device), audio_input_mask, **audio_inputs)
        task = kwargs.pop("task", None) or self.infer_task(input_ids)
        if task == "asr":
            raise ValueError("generate_stream is for tts and vc")
        layout = self.config.layout
        prompt = input_ids[0] if attention_mask is None else input_ids[0][attention_mask[0].bool()]
        voice = layout.block_codes(prompt, "global").unsqueeze(0)
        hop, sampling_rate = self.config.bicodec_config.hop_length, self.config.bicodec_config.sampling_rate
        static_decoding = kwargs.pop("static_decoding", True)

        # A codec with a harmonic synthesiser continues its phase across windows: the stream keeps the phase at every
        # token boundary emitted so far, and starts each window at the phase that puts the chunk's first token where
        # the stream left it. The window's left context must not move it: near the window's edge its pitch differs
        # from the offline decode's, and a phase error there would last for the rest of the stream.
        phases = [0.0] if self.bicodec.harmonic_synthesizer is not None else None

        @torch.no_grad()
        def decode_window(codes: list[int], start: int, stop: int) -> torch.Tensor:
            first = max(0, start - left_context)
            window = torch.tensor([codes[first : stop + right_context]], device=self.device)
            length = torch.tensor([window.shape[1]], device=self.device)
            initial_phase = None
            if phases is not None:
                window_phases = harmonic_frame_phases(
                    self.bicodec.pitch(window, voice, length).frequencies, hop, sampling_rate
                )
                initial_phase = phases[start] - window_phases[:, start - first]
                chunk_phases = torch.remainder(
                    window_phases[0, start - first + 1 : stop - first + 1] + initial_phase, 2 * math.pi
                )
                phases.extend(chunk_phases.tolist())
            audio = self.synthesize(window, voice, length, static_decoding, initial_phase)[0]
            return audio[(start - first) * hop : (stop - first) * hop].float().cpu()

        streamer = GpaAudioStreamer(
            layout, decode_window, first_chunk_tokens, chunk_tokens, right_context, kwargs.pop("stream_timeout", None)
        )
        if static_decoding:
            if kwargs.get("logits_processor"):
                raise ValueError("streaming with extra logits processors needs static_decoding=False")
            compile_step = kwargs.pop("compile_decoding", False)
            generation_config = kwargs.pop("generation_config", None)
            input_ids, attention_mask, task, budgets, config = self.prepare_request(
                input_ids, attention_mask, None, task, generation_config, kwargs
            )
            decoder = self.static_decoder(input_ids, task, config, compile_step)
            steps = decoder.generate_tokens(input_ids, attention_mask, budgets, config.max_new_tokens, 1, streamer)
            for _ in steps:  # the streamer decodes a chunk once its tokens and right context exist
                yield from streamer.ready_chunks()
            yield from streamer.ready_chunks()  # the rest, decoded when the stream ended
            return
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(input_ids, attention_mask, task=task, streamer=streamer, **kwargs)
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.close()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:  # also when the caller stops iterating early (`close()`, a break): generation stops at its next step
            streamer.cancel()
            worker.join()
        if failure and not isinstance(failure[0], GpaStreamCancelled):
            raise failure[0]


__all__ = ["GpaForConditionalGeneration", "GpaGenerateOutput", "cast_audio_tokenizer"]
