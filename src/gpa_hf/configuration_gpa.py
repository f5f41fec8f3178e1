"""Configuration of GPA: a stock Qwen3 decoder, its vocabulary layout, and the two audio tokenizers it speaks with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from itertools import pairwise

from transformers import Qwen3Config
from transformers.configuration_utils import SubConfigSpec

from .configuration_bicodec import BiCodecConfig
from .configuration_glm_speech_tokenizer import GlmSpeechTokenizerConfig

TASKS = ("tts", "asr", "vc")

# The control tokens of GPA prompts, by role.
CONTROL_TOKENS = {
    "start_content": "<|start_content|>",
    "end_content": "<|end_content|>",
    "start_glm": "<|start_glm_token|>",
    "end_glm": "<|end_glm_token|>",
    "start_semantic": "<|start_semantic_token|>",
    "end_semantic": "<|end_semantic_token|>",
    "start_global": "<|start_global_token|>",
    "end_global": "<|end_global_token|>",
    "stop": "<|im_end|>",
}
GLOBAL_TOKEN_FORMAT = "<|bicodec_global_{}|>"
SEMANTIC_TOKEN_FORMAT = "<|bicodec_semantic_{}|>"
TEXT_END_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class GpaVocabularyLayout:
    """Where every kind of token lives in GPA's single vocabulary: the one place that knows the offsets.

    Text BPE ids are `[0, text_vocab_size)`; GLM, global and semantic audio codes `k` become ids
    `offset + k`; control tokens have fixed ids resolved from the tokenizer.
    """

    text_vocab_size: int
    glm_offset: int
    glm_size: int
    global_offset: int
    global_size: int
    semantic_offset: int
    semantic_size: int
    start_content: int
    end_content: int
    start_glm: int
    end_glm: int
    start_semantic: int
    end_semantic: int
    start_global: int
    end_global: int
    stop: int

    @classmethod
    def from_tokenizer(
        cls, tokenizer, bicodec_config: BiCodecConfig, speech_tokenizer_config: GlmSpeechTokenizerConfig
    ) -> GpaVocabularyLayout:
        """Resolve and check every id by name; block sizes are the codebook sizes of the two audio tokenizers.

        The GLM block (whose token names are unknown) ends where the global block starts.
        """
        glm_size = speech_tokenizer_config.codebook_size
        global_size = bicodec_config.global_codebook_size
        semantic_size = bicodec_config.codebook_size

        def token_id(token: str) -> int:
            index = tokenizer.convert_tokens_to_ids(token)
            if index is None or index == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(index) != token:
                raise ValueError(f"the tokenizer has no single token {token!r}, which GPA prompts need")
            return index

        controls = {role: token_id(token) for role, token in CONTROL_TOKENS.items()}
        global_offset = token_id(GLOBAL_TOKEN_FORMAT.format(0))
        semantic_offset = token_id(SEMANTIC_TOKEN_FORMAT.format(0))
        for fmt, offset, size in (
            (GLOBAL_TOKEN_FORMAT, global_offset, global_size),
            (SEMANTIC_TOKEN_FORMAT, semantic_offset, semantic_size),
        ):
            last = token_id(fmt.format(size - 1))
            if last != offset + size - 1:
                raise ValueError(f"{fmt.format(size - 1)} has id {last}, expected {offset + size - 1} (contiguous)")
        layout = cls(
            text_vocab_size=token_id(TEXT_END_TOKEN),
            glm_offset=global_offset - glm_size,
            glm_size=glm_size,
            global_offset=global_offset,
            global_size=global_size,
            semantic_offset=semantic_offset,
            semantic_size=semantic_size,
            **controls,
        )
        layout.validate(len(tokenizer))
        return layout

    def validate(self, vocab_size: int) -> None:
        blocks = [("glm", self.glm_offset, self.glm_size), ("global", self.global_offset, self.global_size)]
        blocks.append(("semantic", self.semantic_offset, self.semantic_size))
        if self.glm_offset < self.text_vocab_size:
            raise ValueError(
                f"GLM block starts at {self.glm_offset}, inside the text range [0, {self.text_vocab_size})"
            )
        for (name, start, size), (next_name, next_start, _) in pairwise(blocks):
            if start + size != next_start:
                raise ValueError(
                    f"the {name} block ends at {start + size}, but the {next_name} block starts at {next_start}"
                )
        end = self.semantic_offset + self.semantic_size
        if end > vocab_size:
            raise ValueError(f"audio tokens reach id {end - 1}, beyond the vocabulary of {vocab_size}")

    def block_mask(self, ids, block: str):
        """Which `ids` (a tensor, or one int) are audio tokens of `block`: "glm", "global" or "semantic"."""
        offset, size = getattr(self, f"{block}_offset"), getattr(self, f"{block}_size")
        return (ids >= offset) & (ids < offset + size)

    def block_codes(self, ids, block: str):
        """The codebook indices of the `block` audio tokens among `ids` (a tensor), in order."""
        return ids[self.block_mask(ids, block)] - getattr(self, f"{block}_offset")

    @property
    def control_ids(self) -> dict[str, int]:
        return {role: getattr(self, role) for role in CONTROL_TOKENS}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GpaVocabularyLayout:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class GpaConfig(Qwen3Config):
    r"""
    Configuration of [`GpaForConditionalGeneration`]: every field of the Qwen3 LM (unchanged, so the published LM
    weights and any Qwen3 runtime apply), plus:

    Args:
        bicodec_config: [`BiCodecConfig`] of the semantic + speaker codec.
        speech_tokenizer_config: [`GlmSpeechTokenizerConfig`] of the ASR tokenizer.
        vocabulary_layout: [`GpaVocabularyLayout`] as a dict (offsets, sizes, control-token ids).
        tasks: the tasks this instance is built for. Leaving out `asr` and `vc` (`tasks=["tts"]`) builds neither
            wav2vec2 nor the GLM tokenizer, for a lean text-to-speech process.
        sampling_rate: audio rate in and out, in Hz.
    """

    model_type = "gpa"
    sub_configs_defaults = {
        "bicodec_config": SubConfigSpec(config_class=BiCodecConfig),
        "speech_tokenizer_config": SubConfigSpec(config_class=GlmSpeechTokenizerConfig),
    }

    bicodec_config: dict | BiCodecConfig | None = None
    speech_tokenizer_config: dict | GlmSpeechTokenizerConfig | None = None
    vocabulary_layout: dict | None = None
    tasks: list[str] | tuple[str, ...] = TASKS
    sampling_rate: int = 16000

    def __post_init__(self, **kwargs):
        self.tasks = list(self.tasks)
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {self.tasks}")
        super().__post_init__(**kwargs)

    @property
    def needs_audio_encoders(self) -> bool:
        """ASR and VC read source audio, which needs wav2vec2 (semantic tokens); ASR also needs the GLM tokens."""
        return "asr" in self.tasks or "vc" in self.tasks

    @property
    def layout(self) -> GpaVocabularyLayout:
        if self.vocabulary_layout is None:
            raise ValueError(
                "this GpaConfig has no vocabulary_layout; build it with GpaVocabularyLayout.from_tokenizer"
            )
        return GpaVocabularyLayout.from_dict(self.vocabulary_layout)

    def lm_config(self) -> Qwen3Config:
        """The plain Qwen3 config of the LM alone, for serving runtimes (vLLM, SGLang, llama.cpp)."""
        values = self.to_dict()
        for key in ("bicodec_config", "speech_tokenizer_config", "vocabulary_layout", "tasks", "sampling_rate"):
            values.pop(key, None)
        values.pop("model_type", None)
        values["architectures"] = ["Qwen3ForCausalLM"]
        values.pop("auto_map", None)
        return Qwen3Config(**values)


__all__ = ["CONTROL_TOKENS", "TASKS", "GpaConfig", "GpaVocabularyLayout"]
