"""Per-task generation for GPA: the defaults, the output constraint and the length budget, in one place."""

from __future__ import annotations

import queue
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from .configuration_gpa import GpaVocabularyLayout

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

    def put(self, value: torch.Tensor) -> None:
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

    def __iter__(self):
        while (chunk := self.queue.get(timeout=self.timeout)) is not None:
            yield chunk


# Below this share of allowed rows, computing only those rows pays off (ASR allows ~85% of them: not worth it).
ALLOWED_ROWS_MAX_FRACTION = 0.5


__all__ = [
    "ALLOWED_ROWS_MAX_FRACTION",
    "TASK_GENERATION_DEFAULTS",
    "GpaAllowedRowsHead",
    "GpaAudioStreamer",
    "GpaTaskLogitsProcessor",
    "allowed_token_mask",
    "build_generation_config",
    "length_budget",
]
