"""GpaProcessor: builds the three task prompts (TTS, ASR, VC) as id sequences, and voices."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import BatchFeature, ProcessorMixin

from .audio_utils import AudioInput, AudioSpan, load_audio, split_at_pauses
from .configuration_gpa import TASKS, GpaVocabularyLayout

DEFAULT_VOICE_FILE = "default_voice.safetensors"
VOICE_FORMAT = "gpa-voice"

# What one prompt of the published GPA takes. It was trained on sequences of up to 1,500 tokens: a 14 s voice
# conversion (700 source + about 700 output semantic tokens) or a 14 s ASR prompt (875 tokens) and its transcript fit.
MAX_SOURCE_SECONDS = 14.0
MAX_TEXT_CHARACTERS = 200

SENTENCE_ENDS, CLAUSE_ENDS, CJK_SENTENCE_ENDS = ".!?;:。！？；…", ",，、", "。！？；"

# Values of `audio_input_mask`: which audio codes fill a placeholder position.
GLM_PLACEHOLDER, SEMANTIC_PLACEHOLDER, GLOBAL_PLACEHOLDER = 1, 2, 3
# The audio features a prompt's placeholders are filled from (see `GpaForConditionalGeneration.fill_audio_tokens`).
AUDIO_INPUT_NAMES = (
    "source_values",
    "source_attention_mask",
    "glm_input_features",
    "glm_attention_mask",
    "glm_audio_index",
    "reference_values",
)


@dataclass
class GpaVoice:
    """A reusable voice: the global (speaker) tokens of a reference recording, computed once.

    Save it with `voice.save("alice.voice")` and pass the file, or the object, wherever reference audio is accepted.
    """

    global_codes: torch.LongTensor
    codebook_size: int

    def __post_init__(self):
        self.global_codes = torch.as_tensor(self.global_codes, dtype=torch.long).reshape(-1)
        if self.global_codes.numel() and (
            self.global_codes.min() < 0 or self.global_codes.max() >= self.codebook_size
        ):
            raise ValueError(f"voice global codes must be in [0, {self.codebook_size})")

    def save(self, path: str | os.PathLike) -> None:
        metadata = {"format": VOICE_FORMAT, "codebook_size": str(self.codebook_size)}
        save_file({"global_codes": self.global_codes.contiguous()}, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GpaVoice:
        try:
            with safe_open(os.fspath(path), "pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != VOICE_FORMAT or "global_codes" not in handle.keys():  # noqa: SIM118
                    raise ValueError(
                        f"{path}: not a gpa-hf voice file (expected format={VOICE_FORMAT!r} with 'global_codes', "
                        f"got metadata {metadata} and tensors {list(handle.keys())})"
                    )
                codes = handle.get_tensor("global_codes")
        except (OSError, RuntimeError, SafetensorError) as error:
            raise ValueError(f"{path}: not a gpa-hf voice file ({error})") from error
        return cls(codes, int(metadata["codebook_size"]))

    @staticmethod
    def is_voice_file(path: str | os.PathLike) -> bool:
        return str(path).endswith((".voice", ".safetensors"))


VoiceInput = GpaVoice | AudioInput


def has_cjk(text: str) -> bool:
    return any(
        "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" or "\u3040" <= char <= "\u30ff" for char in text
    )


def _cut_rank(text: str, position: int) -> int | None:
    """How good a place to cut `text` before `position` is: 0 a sentence end, 1 a clause end, 2 a space, 3 between
    CJK characters; None inside a word."""
    before, after = text[position - 1], text[position]
    if before in SENTENCE_ENDS and (after.isspace() or before in CJK_SENTENCE_ENDS):
        return 0
    if before in CLAUSE_ENDS:
        return 1
    if after.isspace():
        return 2
    if has_cjk(before + after):
        return 3
    return None


def split_text(text: str, max_characters: int) -> list[str]:
    """Cut text into pieces of at most `max_characters`, best at sentence ends, else at commas, else between words.

    Whole sentences are packed together while they fit; a longer sentence is cut at its last comma, space (or, in
    CJK text, character) that fits. A single word longer than the limit stays whole. The pieces hold all the text,
    in order: joined, they give the text again (up to the whitespace at the cuts).
    """
    if max_characters < 1:
        raise ValueError(f"max_characters must be >= 1, got {max_characters}")
    text, pieces, start = text.strip(), [], 0
    while len(text) - start > max_characters:
        ranked = [
            (rank, p) for p in range(start + 1, start + max_characters + 1) if (rank := _cut_rank(text, p)) is not None
        ]
        if ranked:
            best = min(rank for rank, _ in ranked)
            cut = max(p for rank, p in ranked if rank == best)
        else:  # one word longer than the limit
            space = re.compile(r"\s").search(text, start + max_characters)
            cut = space.start() if space else len(text)
        pieces.append(text[start:cut].strip())
        start = cut
        while start < len(text) and text[start].isspace():
            start += 1
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def join_texts(texts: Sequence[str]) -> str:
    """Texts of consecutive pieces as one: a space between them, none where both sides are CJK."""
    joined = ""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        if joined and not (has_cjk(joined[-1]) and has_cjk(text[0])):
            joined += " "
        joined += text
    return joined


@dataclass
class GpaRequestPieces:
    """Requests cut into pieces that one prompt each can take ([`GpaProcessor.split`]), and the way back.

    Run the pieces in batches (`batches` gives the processor's arguments for each), then `join` the pieces' outputs
    into one per request: transcripts joined by spaces, waveforms end to end.
    """

    task: str
    inputs: list  # a text (TTS) or a waveform (ASR, VC) per piece
    voices: list | None  # the voice of each piece's request, a GpaVoice or a waveform (TTS, VC)
    owners: list[int]  # the request each piece belongs to
    silent: list[bool]  # pieces of pure silence, left out of the batches: no text, or as much silence, for them
    num_requests: int
    sampling_rate: int  # of the waveforms

    def __len__(self) -> int:
        """The pieces a model runs (silent ones left out)."""
        return len(self.silent) - sum(self.silent)

    def batches(self, batch_size: int) -> Iterator[dict]:
        """Processor arguments for consecutive groups of at most `batch_size` pieces: `processor(**arguments)`."""
        sounding = [index for index, silent in enumerate(self.silent) if not silent]
        for start in range(0, len(sounding), batch_size):
            chosen = sounding[start : start + batch_size]
            arguments: dict = {"task": self.task, "sampling_rate": self.sampling_rate}
            arguments["text" if self.task == "tts" else "audio"] = [self.inputs[i] for i in chosen]
            if self.voices is not None:
                arguments["voice"] = [self.voices[i] for i in chosen]
            yield arguments

    def join(self, outputs: Sequence) -> list:
        """One output per request from one per piece that ran, in order: texts joined, waveforms concatenated."""
        if len(outputs) != len(self):
            raise ValueError(f"got {len(outputs)} outputs for {len(self)} pieces")
        given = iter(outputs)
        grouped: list[list] = [[] for _ in range(self.num_requests)]
        for owner, piece, silent in zip(self.owners, self.inputs, self.silent):
            if not silent:
                grouped[owner].append(next(given))
            elif self.task == "vc":
                grouped[owner].append(torch.zeros(len(piece)))
        if self.task == "asr":
            return [join_texts(parts) for parts in grouped]
        return [torch.cat([torch.as_tensor(part) for part in parts]) for parts in grouped]


class GpaProcessor(ProcessorMixin):
    r"""
    Turns text and audio into GPA prompts.

    `processor(task="tts", text=..., voice=...)`, `processor(task="asr", audio=...)` and
    `processor(task="vc", audio=source, voice=...)` return left-padded `input_ids` in which audio positions are
    placeholders (`audio_input_mask`: 1 GLM, 2 semantic, 3 global), plus the audio features that
    [`GpaForConditionalGeneration`] tokenizes and writes into them. Prompts then equal the reference's exactly:

    - ASR: `<start_glm> G <end_glm> <start_semantic> S <end_semantic> <start_content>`
    - TTS: `<start_global> P <end_global> <start_content> T <end_content>`
    - VC:  `<start_global> P <end_global> <start_semantic> S <end_semantic> <end_content>`

    User text is encoded with special-token parsing off: a literal `<|end_content|>` in it stays text.

    One prompt takes at most `max_source_seconds` of source audio and `max_text_characters` of text (what the model
    was trained on; `None`: no limit), and longer input is refused with an error: a model fails on input much longer
    than it has seen, and a TTS model stops early on long text, dropping its end. [`split`] cuts longer requests
    into pieces (audio at pauses, text at sentence ends) and joins their outputs back; the pipelines, the CLI and
    `gpa-hf eval` do so by themselves.
    """

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        vocabulary_layout: dict | None = None,
        max_source_seconds: float | None = MAX_SOURCE_SECONDS,
        max_text_characters: int | None = MAX_TEXT_CHARACTERS,
    ):
        super().__init__(feature_extractor, tokenizer)
        self.vocabulary_layout = vocabulary_layout
        self.max_source_seconds = max_source_seconds
        self.max_text_characters = max_text_characters
        # Saved beside the processor files as `default_voice.safetensors`.
        self.default_voice: GpaVoice | None = None

    @property
    def model_input_names(self) -> list[str]:
        """The prompt's ids first: they are the LM's input, and the Trainer groups rows by the first name's length."""
        names = [*self.tokenizer.model_input_names, *self.feature_extractor.model_input_names]
        return list(dict.fromkeys(name for name in names if name not in self.unused_input_names))

    @property
    def layout(self) -> GpaVocabularyLayout:
        if self.vocabulary_layout is None:
            raise ValueError("this processor has no vocabulary_layout")
        return GpaVocabularyLayout.from_dict(self.vocabulary_layout)

    @property
    def pad_token_id(self) -> int:
        """Written into padding positions (always masked): the tokenizer's pad token, else `<|im_end|>`."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.layout.stop

    # ---- text ----------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty string, got {text!r}")
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        limit = self.layout.text_vocab_size
        if any(i >= limit for i in ids):
            raise ValueError(f"text {text!r} encoded to non-text ids; the tokenizer splits special tokens wrongly")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text of generated ids: only text tokens count (control and audio tokens are dropped)."""
        limit = self.layout.text_vocab_size
        return self.tokenizer.decode([int(i) for i in ids if int(i) < limit], skip_special_tokens=True).strip()

    # ---- voices --------------------------------------------------------------------------------------------
    def load_voice(self, voice: VoiceInput | None) -> GpaVoice | AudioInput:
        """A `GpaVoice` (given, loaded from a voice file, or the default voice), or audio to take one from."""
        if voice is None:
            if self.default_voice is None:
                raise ValueError("no voice given and this model has no default voice: pass voice=<audio or voice>")
            return self.default_voice
        if isinstance(voice, (str, os.PathLike)) and GpaVoice.is_voice_file(voice):
            loaded = GpaVoice.load(voice)
            if (
                loaded.global_codes.numel() != self.num_global_tokens
                or loaded.codebook_size != self.layout.global_size
            ):
                raise ValueError(
                    f"{voice}: a voice of {loaded.global_codes.numel()} tokens from a {loaded.codebook_size}-code "
                    f"codebook; this model expects {self.num_global_tokens} tokens from {self.layout.global_size}"
                )
            return loaded
        return voice

    def _load_voices(self, voice: VoiceInput | Sequence[VoiceInput] | None, count: int) -> list:
        """One voice (`load_voice`) for each of `count` inputs: from one voice for all, or one per input."""
        voices = self._as_list(voice) or [None]
        if len(voices) == 1:
            voices = voices * count
        if len(voices) != count:
            raise ValueError(f"got {len(voices)} voices for {count} inputs: give one voice or one per input")
        return [self.load_voice(v) for v in voices]

    @property
    def num_global_tokens(self) -> int:
        return 32 if self.default_voice is None else self.default_voice.global_codes.numel()

    # ---- prompts -------------------------------------------------------------------------------------------
    def __call__(
        self,
        task: str,
        text: str | Sequence[str] | None = None,
        audio: AudioInput | Sequence[AudioInput] | None = None,
        voice: VoiceInput | Sequence[VoiceInput] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {list(TASKS)}")
        layout = self.layout
        texts = self._as_list(text)
        sources = self._as_list(audio)
        if task == "tts":
            if not texts:
                raise ValueError("text-to-speech needs text=")
            if sources:
                raise ValueError("text-to-speech takes text= and voice=, not audio=")
            batch_size = len(texts)
        else:
            if not sources:
                raise ValueError(f"{task} needs audio= (the source speech)")
            if texts:
                raise ValueError(f"{task} takes no text=")
            batch_size = len(sources)
        if self.max_text_characters is not None:
            for index, item in enumerate(texts):
                if isinstance(item, str) and len(item.strip()) > self.max_text_characters:
                    raise ValueError(
                        f"text {index} has {len(item.strip())} characters; one prompt of this model takes at most "
                        f"{self.max_text_characters} (max_text_characters): split it with processor.split(), as "
                        "the pipelines and the CLI do"
                    )
        data: dict = {}
        semantic_counts, glm_counts = [], []
        if sources:
            features, semantic_counts, glm_counts = self.feature_extractor.source_features(
                sources, sampling_rate, with_glm=task == "asr"
            )
            self._check_source_lengths(features["source_attention_mask"].sum(-1).tolist())
            data.update(features)
        voices: list = []
        if task in ("tts", "vc"):
            voices = self._load_voices(voice, batch_size)
            audio_voices = [v for v in voices if not isinstance(v, GpaVoice)]
            if audio_voices:
                data["reference_values"] = self.feature_extractor.reference_features(audio_voices, sampling_rate)[
                    "reference_values"
                ]
        sequences, kinds = [], []
        for index in range(batch_size):
            glm = semantic = voice_part = None
            if task == "asr":
                glm = ([0] * glm_counts[index], GLM_PLACEHOLDER)
            if task in ("asr", "vc"):
                semantic = ([0] * semantic_counts[index], SEMANTIC_PLACEHOLDER)
            if task in ("tts", "vc"):
                voice_item = voices[index]
                if isinstance(voice_item, GpaVoice):
                    voice_part = ((voice_item.global_codes + layout.global_offset).tolist(), 0)
                else:
                    voice_part = ([0] * self.num_global_tokens, GLOBAL_PLACEHOLDER)
            text_ids = self.encode_text(texts[index]) if task == "tts" else None
            parts = self._prompt_parts(task, text_ids, glm, voice_part, semantic)
            sequences.append([i for ids, _ in parts for i in ids])
            kinds.append([kind for ids, kind in parts for _ in ids])
        data.update(self._left_pad(sequences, kinds))
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_source_lengths(self, num_samples: Sequence[int]) -> None:
        if self.max_source_seconds is None:
            return
        rate = self.feature_extractor.sampling_rate
        for index, count in enumerate(num_samples):
            if count > self.max_source_seconds * rate:
                raise ValueError(
                    f"audio {index} is {count / rate:.1f} s long; one prompt of this model takes at most "
                    f"{self.max_source_seconds} s (max_source_seconds): split it at pauses with processor.split(), "
                    "as the pipelines, the CLI and gpa-hf eval do"
                )

    def split(
        self,
        task: str,
        text: str | Sequence[str] | None = None,
        audio: AudioInput | Sequence[AudioInput] | None = None,
        voice: VoiceInput | Sequence[VoiceInput] | None = None,
        sampling_rate: int | None = None,
    ) -> GpaRequestPieces:
        """Requests (the arguments of `__call__`) cut into pieces one prompt each can take.

        Text longer than `max_text_characters` is cut at sentence ends ([`split_text`]); audio longer than
        `max_source_seconds` at pauses ([`gpa_hf.audio_utils.split_at_pauses`]). Each piece keeps its request's voice.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {list(TASKS)}")
        requests = self._as_list(text) if task == "tts" else self._as_list(audio)
        if not requests:
            raise ValueError(
                "text-to-speech needs text=" if task == "tts" else f"{task} needs audio= (the source speech)"
            )
        rate = self.feature_extractor.sampling_rate
        inputs, owners, silent = [], [], []
        for index, request in enumerate(requests):
            if task == "tts":
                if not isinstance(request, str) or not request.strip():
                    raise ValueError(f"text must be a non-empty string, got {request!r}")
                limit = self.max_text_characters
                parts = [request] if limit is None else split_text(request, limit)
                silent += [False] * len(parts)
            else:
                waveform = load_audio(request, sampling_rate, rate)
                limit = self.max_source_seconds
                spans = (
                    [AudioSpan(0, waveform.size, False)] if limit is None else split_at_pauses(waveform, rate, limit)
                )
                parts = [waveform[span.start : span.stop] for span in spans]
                silent += [span.silent for span in spans]
            inputs.extend(parts)
            owners.extend([index] * len(parts))
        voices = None
        if task in ("tts", "vc"):
            loaded = self._load_voices(voice, len(requests))
            loaded = [v if isinstance(v, GpaVoice) else load_audio(v, sampling_rate, rate) for v in loaded]
            voices = [loaded[owner] for owner in owners]
        return GpaRequestPieces(task, inputs, voices, owners, silent, len(requests), rate)

    def _prompt_parts(
        self,
        task: str,
        text_ids: list[int] | None,
        glm: tuple[list[int], int] | None,
        voice: tuple[list[int], int] | None,
        semantic: tuple[list[int], int] | None,
    ) -> list[tuple[list[int], int]]:
        """The task's prompt as (ids, placeholder kind) parts; audio parts are codes (kind 0) or placeholders."""
        layout = self.layout
        parts: list[tuple[list[int], int]] = []
        if task == "asr":
            parts += [([layout.start_glm], 0), glm, ([layout.end_glm], 0)]
        if task in ("tts", "vc"):
            parts += [([layout.start_global], 0), voice, ([layout.end_global], 0)]
        if task in ("asr", "vc"):
            parts += [([layout.start_semantic], 0), semantic, ([layout.end_semantic], 0)]
        if task == "asr":
            parts.append(([layout.start_content], 0))
        elif task == "tts":
            parts += [([layout.start_content], 0), (text_ids, 0), ([layout.end_content], 0)]
        else:
            parts.append(([layout.end_content], 0))
        return parts

    def training_example(
        self,
        task: str,
        text: str | None = None,
        glm_ids: Sequence[int] | None = None,
        semantic_ids: Sequence[int] | None = None,
        global_ids: Sequence[int] | None = None,
        target_ids: Sequence[int] | None = None,
    ) -> dict[str, list[int]]:
        """One training sequence and its labels, from audio already turned into vocabulary ids.

        The prompt is the inference prompt of `__call__`; the target follows it and ends with `<|im_end|>`:
        ASR learns `text <end_content> <im_end>`, TTS and VC learn `target_ids <im_end>` (semantic ids of the
        target speech). Labels are -100 on the prompt, so only the target is learnt.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {list(TASKS)}")
        layout = self.layout
        needed = {"asr": ("glm_ids", "semantic_ids", "text"), "tts": ("global_ids", "text", "target_ids")}
        needed["vc"] = ("global_ids", "semantic_ids", "target_ids")
        given = {"text": text, "glm_ids": glm_ids, "semantic_ids": semantic_ids}
        given.update(global_ids=global_ids, target_ids=target_ids)
        missing = [name for name in needed[task] if given[name] is None or len(given[name]) == 0]
        if missing:
            raise ValueError(f"a {task} training example needs {', '.join(missing)}")
        text_ids = self.encode_text(text) if text is not None else None
        parts = self._prompt_parts(
            task,
            text_ids if task == "tts" else None,
            (list(glm_ids), 0) if glm_ids is not None else None,
            (list(global_ids), 0) if global_ids is not None else None,
            (list(semantic_ids), 0) if semantic_ids is not None else None,
        )
        prompt = [i for ids, _ in parts for i in ids]
        target = [*text_ids, layout.end_content] if task == "asr" else list(target_ids)
        target.append(layout.stop)
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    def _left_pad(self, sequences: list[list[int]], kinds: list[list[int]]) -> dict[str, np.ndarray]:
        longest = max(len(s) for s in sequences)
        input_ids = np.full((len(sequences), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        audio_input_mask = np.zeros_like(input_ids)
        for row, (ids, kind) in enumerate(zip(sequences, kinds)):
            input_ids[row, longest - len(ids) :] = ids
            attention_mask[row, longest - len(ids) :] = 1
            audio_input_mask[row, longest - len(ids) :] = kind
        return {"input_ids": input_ids, "attention_mask": attention_mask, "audio_input_mask": audio_input_mask}

    @staticmethod
    def _as_list(value) -> list:
        if value is None:
            return []
        if isinstance(value, (list, tuple)):
            return list(value)
        return [value]

    # ---- saving --------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        output = super().save_pretrained(save_directory, **kwargs)
        if self.default_voice is not None:
            self.default_voice.save(Path(save_directory) / DEFAULT_VOICE_FILE)
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        voice_path = Path(pretrained_model_name_or_path) / DEFAULT_VOICE_FILE
        if processor.default_voice is None:
            if voice_path.is_file():
                processor.default_voice = GpaVoice.load(voice_path)
            elif not Path(pretrained_model_name_or_path).is_dir():
                processor.default_voice = cls._download_default_voice(pretrained_model_name_or_path, kwargs)
        return processor

    @staticmethod
    def _download_default_voice(repo_id: str, kwargs: dict) -> GpaVoice | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return GpaVoice.load(hf_hub_download(repo_id, DEFAULT_VOICE_FILE, revision=kwargs.get("revision")))
        except EntryNotFoundError:
            return None


def run_requests(
    model,
    processor: GpaProcessor,
    task: str,
    batch_size: int = 8,
    generate_kwargs: dict | None = None,
    **request,
) -> list:
    """Generate for requests of any length: transcripts (ASR) or 16 kHz waveforms (TTS, VC), one per request.

    `request` holds the processor's arguments (`text`, `audio`, `voice`, `sampling_rate`). Requests longer than one
    prompt takes are cut ([`GpaProcessor.split`]); the pieces run in batches of `batch_size`, with a progress bar
    when there is more than one batch, and their outputs are joined per request.
    """
    pieces = processor.split(task, **request)
    batches = -(-len(pieces) // batch_size)  # silent pieces are not run
    outputs: list = []
    for arguments in tqdm(pieces.batches(batch_size), total=batches, desc=task, disable=batches <= 1):
        inputs = processor(**arguments)
        generated = model.generate(**inputs, task=task, output_audio=task != "asr", **(generate_kwargs or {}))
        if task == "asr":
            length = inputs["input_ids"].shape[1]
            outputs.extend(processor.decode_text(sequence[length:]) for sequence in generated)
        else:
            outputs.extend(audio.float().cpu() for audio in generated.audio)
    return pieces.join(outputs)


__all__ = [
    "DEFAULT_VOICE_FILE",
    "GpaProcessor",
    "GpaRequestPieces",
    "GpaVoice",
    "has_cjk",
    "join_texts",
    "run_requests",
    "split_text",
]
