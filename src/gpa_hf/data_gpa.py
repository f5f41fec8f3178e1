"""Training data for GPA: rows of speech and text become tokenized sequences with labels, once, with caching.

Rows come from the reference's jsonl format or from any `datasets` dataset with the same columns (an `Audio`
column works too). Audio is tokenized in batches inside `datasets.map`, whose cache makes a second run free. Rows
that cannot be used (missing or unreadable audio, a target longer than `max_length`, ...) are skipped, never cut
short, and counted by reason in a [`PreparationReport`].
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio_utils import MissingAudioError, load_audio
from .configuration_gpa import GpaVocabularyLayout
from .processing_gpa import GLM_PLACEHOLDER, GLOBAL_PLACEHOLDER, SEMANTIC_PLACEHOLDER

# Task names of the reference's data files, and gpa-hf's own.
TASK_ALIASES = {"stt": "asr", "asr": "asr", "tts-a": "tts", "tts": "tts", "vc": "vc"}
DATA_COLUMNS = ("task", "text", "audio", "ref_audio", "vc_audio", "begin_time", "end_time")
AUDIO_COLUMNS = ("audio", "ref_audio", "vc_audio")
DEFAULT_MAX_LENGTH = 1500  # the reference's model_max_length
# Where a row without `ref_audio` takes its voice from: a TTS row's own utterance, a VC row's target utterance.
VOICE_FALLBACK = {"tts": "audio", "vc": "vc_audio"}
# Bump when the prepared sequences change, so that old caches are not reused.
PREPARATION_VERSION = "1"


def load_jsonl_dataset(path: str | os.PathLike):
    """Rows of a reference-format jsonl file as a `datasets.Dataset`, audio paths made relative to the file.

    Columns: `task`, `text`, `audio`, `ref_audio`, `vc_audio`, `begin_time`, `end_time` (seconds, -1 = whole file).
    """
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from error
        if not isinstance(row, dict) or "task" not in row:
            raise ValueError(f"{path}, line {number}: expected an object with a 'task', got {line[:80]!r}")
        rows.append(
            {
                "task": str(row["task"]),
                "text": str(row.get("text") or ""),
                **{name: _resolve(path.parent, row.get(name)) for name in AUDIO_COLUMNS},
                "begin_time": float(row.get("begin_time", -1)),
                "end_time": float(row.get("end_time", -1)),
            }
        )
    if not rows:
        raise ValueError(f"{path}: no rows")
    return Dataset.from_list(rows)


def read_row_audio(row: dict, name: str, sampling_rate: int = 16000) -> np.ndarray | str:
    """The clip a data row names in column `name`, or why it cannot be read (a skip reason).

    `begin_time` / `end_time` cut the row's own `audio` (other columns name whole reference clips).
    """
    own = name == "audio"
    try:
        return load_audio(
            row[name],
            target_sampling_rate=sampling_rate,
            start_time=row.get("begin_time") if own else None,
            end_time=row.get("end_time") if own else None,
        )
    except MissingAudioError:
        return "missing audio file"
    except ValueError:
        return "unreadable audio"


def _resolve(folder: Path, value) -> str:
    if not value:
        return ""
    return str(value) if os.path.isabs(value) else str(folder / value)


@dataclass
class PreparationReport:
    """What data preparation kept and skipped, per task; `skipped` maps task -> reason -> count."""

    kept: Counter = field(default_factory=Counter)
    skipped: dict[str, Counter] = field(default_factory=dict)

    @classmethod
    def from_columns(cls, tasks: Iterable[str], reasons: Iterable[str]) -> PreparationReport:
        report = cls()
        for task, reason in zip(tasks, reasons):
            if reason:
                report.skipped.setdefault(task, Counter())[reason] += 1
            else:
                report.kept[task] += 1
        return report

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def num_skipped(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "kept": dict(self.kept),
            "skipped": {task: dict(reasons) for task, reasons in self.skipped.items()},
            "num_kept": self.num_kept,
            "num_skipped": self.num_skipped,
        }

    def __str__(self) -> str:
        lines = [f"kept {self.num_kept} rows, skipped {self.num_skipped}"]
        for task in sorted(set(self.kept) | set(self.skipped)):
            lines.append(f"  {task}: kept {self.kept.get(task, 0)}")
            for reason, count in sorted(self.skipped.get(task, {}).items()):
                lines.append(f"    skipped {count}: {reason}")
        return "\n".join(lines)


class GpaTrainingDataBuilder:
    """Turns a batch of data rows into training sequences: the `datasets.map` function of [`prepare_dataset`]."""

    def __init__(self, model, processor, max_length: int = DEFAULT_MAX_LENGTH, default_task: str | None = None):
        self.model = model
        self.processor = processor
        self.max_length = max_length
        self.default_task = default_task
        self.sampling_rate = processor.feature_extractor.sampling_rate
        self.min_samples = processor.feature_extractor.bicodec.min_samples

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(batch["audio"])
        rows = [{name: values[index] for name, values in batch.items()} for index in range(size)]
        loaded = [self._load_row(row) for row in rows]
        self._tokenize([item for item in loaded if isinstance(item, dict)])
        outputs: dict[str, list] = {"task": [], "input_ids": [], "labels": [], "skip_reason": []}
        for item in loaded:
            example, reason = {"input_ids": [], "labels": []}, ""
            if isinstance(item, tuple):
                task, reason = item
            else:
                task = item["task"]
                try:
                    example = self._example(item)
                except ValueError as error:
                    reason = str(error)
            outputs["task"].append(task)
            outputs["input_ids"].append(example["input_ids"] if not reason else [])
            outputs["labels"].append(example["labels"] if not reason else [])
            outputs["skip_reason"].append(reason)
        return outputs

    # ---- one row -----------------------------------------------------------------------------------------
    def _load_row(self, row: dict) -> dict | tuple[str, str]:
        """The row's decoded audio and text, or (task, reason it is skipped)."""
        raw_task = row.get("task") or self.default_task
        task = TASK_ALIASES.get(str(raw_task))
        if task is None:
            return str(raw_task), f"unknown task (expected one of {sorted(TASK_ALIASES)})"
        text = (row.get("text") or "").strip()
        if task in ("asr", "tts") and not text:
            return task, "empty text"
        needed = {"asr": ("audio",), "tts": ("audio", "ref_audio"), "vc": ("audio", "vc_audio", "ref_audio")}[task]
        item = {"task": task, "text": text}
        for name in needed:
            source = row.get(name)
            if name == "ref_audio":
                same = [other for other in ("audio", "vc_audio") if other in item and _same_file(source, row[other])]
                if not source or same:  # the voice of a clip already read: the row's own, or the VC target's
                    item[name] = item[same[0] if same else VOICE_FALLBACK[task]]
                    continue
            if not source:
                return task, f"no {name}"
            samples = read_row_audio(row, name, self.sampling_rate)
            if isinstance(samples, str):
                return task, samples
            if samples.size < self.min_samples:
                return task, f"audio shorter than {self.min_samples} samples"
            if not np.any(samples):
                return task, "silent audio"
            item[name] = samples
        return item

    def _tokenize(self, items: list[dict]) -> None:
        """Add the audio ids each item needs, computed in one batch per kind (large encoders on CPU: the semantic
        and GLM batches side by side, see `audio_token_ids`)."""
        features = self.processor.feature_extractor
        semantic = [(item, "audio") for item in items] + [(item, "vc_audio") for item in items if "vc_audio" in item]
        asr = [item for item in items if item["task"] == "asr"]
        voiced = [item for item in items if "ref_audio" in item]
        inputs = {}
        if semantic:
            source, _, _ = features.source_features([item[name] for item, name in semantic], self.sampling_rate)
            inputs.update(source)
        if asr:
            glm = features.glm([item["audio"] for item in asr], sampling_rate=self.sampling_rate)
            inputs.update(
                glm_input_features=glm["input_features"],
                glm_attention_mask=glm["attention_mask"],
                glm_audio_index=glm["audio_index"],
            )
        if voiced:
            reference = features.reference_features([item["ref_audio"] for item in voiced], self.sampling_rate)
            inputs["reference_values"] = reference["reference_values"]
        ids = self.model.audio_token_ids(**inputs)
        for (item, name), values in zip(semantic, ids.get(SEMANTIC_PLACEHOLDER, [])):
            item[f"{name}_semantic_ids"] = values.tolist()
        for item, values in zip(asr, ids.get(GLM_PLACEHOLDER, [])):
            item["glm_ids"] = values.tolist()
        for item, values in zip(voiced, ids.get(GLOBAL_PLACEHOLDER, [])):
            item["global_ids"] = values.tolist()

    def _example(self, item: dict) -> dict[str, list[int]]:
        task = item["task"]
        if task == "asr":
            example = self.processor.training_example(
                "asr", text=item["text"], glm_ids=item["glm_ids"], semantic_ids=item["audio_semantic_ids"]
            )
        elif task == "tts":
            example = self.processor.training_example(
                "tts", text=item["text"], global_ids=item["global_ids"], target_ids=item["audio_semantic_ids"]
            )
        else:
            example = self.processor.training_example(
                "vc",
                global_ids=item["global_ids"],
                semantic_ids=item["audio_semantic_ids"],
                target_ids=item["vc_audio_semantic_ids"],
            )
        if len(example["input_ids"]) > self.max_length:
            raise ValueError(f"longer than max_length ({self.max_length} tokens)")
        return example


def _same_file(first, second) -> bool:
    return isinstance(first, str) and isinstance(second, str) and os.path.abspath(first) == os.path.abspath(second)


def _file_stamp(value) -> str:
    """Path, size and modification time of a file input, so that edited audio invalidates the cache."""
    if isinstance(value, str) and value:
        try:
            stat = os.stat(value)
        except OSError:
            return f"{value}:missing"
        return f"{value}:{stat.st_size}:{stat.st_mtime_ns}"
    return ""


def _model_fingerprint(model, processor, max_length: int, default_task: str | None) -> str:
    from datasets.fingerprint import Hasher

    hasher = Hasher()
    hasher.update(PREPARATION_VERSION)
    # Only what decides the tokens: the audio tokenizers' configs and weights, the layout, the features.
    hasher.update(model.config.bicodec_config.to_json_string(use_diff=False))
    if model.config.speech_tokenizer_config is not None:
        hasher.update(model.config.speech_tokenizer_config.to_json_string(use_diff=False))
    for name, tensor in model.state_dict().items():
        if name.startswith(("bicodec.", "speech_tokenizer.")):
            # The codecs decide the tokens; a strided sample of each weight identifies them cheaply.
            flat = tensor.detach().reshape(-1)
            hasher.update(name)
            hasher.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    hasher.update(json.dumps(processor.vocabulary_layout, sort_keys=True))
    hasher.update(repr(processor.feature_extractor.to_dict()))
    hasher.update(f"{max_length}:{default_task}")
    return hasher.hexdigest()


def prepare_dataset(
    dataset,
    model,
    processor,
    max_length: int = DEFAULT_MAX_LENGTH,
    task: str | None = None,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    load_from_cache_file: bool = True,
):
    """Tokenize a dataset of data rows into training sequences.

    Args:
        dataset: a `datasets.Dataset` with the columns of [`load_jsonl_dataset`]; `task` may be omitted when
            `task=` is given, and the audio columns may be `datasets.Audio` features.
        model, processor: the GPA model whose audio tokenizers make the codes, and its processor.
        max_length: rows whose whole sequence is longer are skipped (never truncated).
        cache_dir: where the tokenized rows are cached (default: the `datasets` cache); a rerun with the same rows,
            model and settings reads the cache instead of tokenizing again.

    Returns:
        `(prepared, report)`: a dataset with `task`, `input_ids` and `labels` (rows in input order, skipped rows
        left out) and the [`PreparationReport`].
    """
    from datasets import Audio, config
    from datasets.fingerprint import Hasher

    if "text" not in dataset.column_names:
        dataset = dataset.add_column("text", [""] * len(dataset))
    if "task" not in dataset.column_names and task is None:
        raise ValueError(f"the dataset has no 'task' column; pass task= (one of {sorted(TASK_ALIASES)})")
    if "audio" not in dataset.column_names:
        raise ValueError(f"the dataset needs an 'audio' column, got columns {dataset.column_names}")
    for name, feature in dataset.features.items():
        if isinstance(feature, Audio) and feature.decode:
            dataset = dataset.cast_column(name, Audio(decode=False))  # decoded by load_audio, at the model's rate
    stamps = [
        "|".join(_file_stamp(row.get(name)) for name in AUDIO_COLUMNS)
        for row in dataset.select_columns([c for c in AUDIO_COLUMNS if c in dataset.column_names])
    ]
    fingerprint = Hasher.hash(
        [dataset._fingerprint, stamps, _model_fingerprint(model, processor, max_length, task), batch_size]
    )
    cache_dir = Path(cache_dir or Path(config.HF_DATASETS_CACHE) / "gpa_hf")
    cache_dir.mkdir(parents=True, exist_ok=True)
    builder = GpaTrainingDataBuilder(model, processor, max_length=max_length, default_task=task)
    tokenized = dataset.map(
        builder,
        batched=True,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        cache_file_name=str(cache_dir / f"prepared-{fingerprint}.arrow"),
        load_from_cache_file=load_from_cache_file,
        new_fingerprint=fingerprint,
        desc="tokenizing audio",
    )
    report = PreparationReport.from_columns(tokenized["task"], tokenized["skip_reason"])
    kept = [index for index, reason in enumerate(tokenized["skip_reason"]) if not reason]
    prepared = tokenized.select(kept).remove_columns("skip_reason")
    return prepared, report


class GpaDataCollator:
    """Pads prepared GPA examples into a batch: right padding, `attention_mask`, labels padded with -100.

    Args:
        pad_token_id: the id written into padding positions of `input_ids` (masked out, never learnt).
        pad_to_multiple_of: round the batch length up (8 or 64 suit tensor cores).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        for feature in features:
            if len(feature["input_ids"]) != len(feature["labels"]):
                raise ValueError(
                    f"input_ids and labels differ in length ({len(feature['input_ids'])} vs {len(feature['labels'])})"
                )
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(features), longest), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(features), longest), -100, dtype=np.int64)
        attention_mask = np.zeros((len(features), longest), dtype=np.int64)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = feature["input_ids"]
            labels[row, :length] = feature["labels"]
            attention_mask[row, :length] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }


def add_semantic_input_noise(
    input_ids: torch.LongTensor,
    labels: torch.LongTensor,
    layout: GpaVocabularyLayout,
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """A copy of `input_ids` in which each semantic token that is also a target is, with `probability`, another one.

    A training regulariser against exposure bias: at inference the LM continues from semantic tokens it sampled
    itself, some of them wrong, while teacher forcing only ever shows it correct ones. Only the inputs change:
    every label stays the true token, so the LM learns to get back on track after a wrong token. Prompt tokens
    (labels -100), text targets and control tokens are never touched.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"semantic input noise must be a probability in [0, 1], got {probability}")
    targets = (labels != -100) & layout.block_mask(labels, "semantic") & (input_ids == labels)
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    noisy = targets & (draw < probability)
    # A shift by 1..size-1 within the codebook: the replacement always differs from the true token.
    shift = torch.randint(1, layout.semantic_size, input_ids.shape, generator=generator, device=input_ids.device)
    replaced = (input_ids - layout.semantic_offset + shift) % layout.semantic_size + layout.semantic_offset
    return torch.where(noisy, replaced, input_ids)


__all__ = [
    "TASK_ALIASES",
    "GpaDataCollator",
    "GpaTrainingDataBuilder",
    "PreparationReport",
    "add_semantic_input_noise",
    "load_jsonl_dataset",
    "prepare_dataset",
    "read_row_audio",
]
