"""Fine-tuning GPA with the stock `transformers.Trainer` (what `gpa-hf finetune` runs).

Only the LM trains: the audio tokenizers are frozen, since every prepared sequence was made with them. A held-out
split is evaluated every epoch, bf16 is used on GPUs that support it, and LoRA adapters (through peft) can replace
full fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from .configuration_gpa import GpaVocabularyLayout
from .data_gpa import (
    DEFAULT_MAX_LENGTH,
    GpaDataCollator,
    add_semantic_input_noise,
    load_jsonl_dataset,
    prepare_dataset,
)

# The reference's LoRA targets: every attention and MLP projection of the LM.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_training_data(model, processor, data: str | Path, max_length: int = DEFAULT_MAX_LENGTH):
    """A prepared dataset: a `gpa-hf prepare-data` folder as it is, or a jsonl file prepared (and cached) here."""
    if Path(data).is_dir():
        from datasets import load_from_disk

        return load_from_disk(str(data))
    prepared, report = prepare_dataset(load_jsonl_dataset(data), model, processor, max_length=max_length)
    print(report)
    if report.num_kept == 0:
        raise ValueError(f"{data}: no row could be prepared, so there is nothing to train on")
    return prepared


def freeze_audio_tokenizers(model) -> None:
    for module in (model.bicodec, model.speech_tokenizer):
        if module is not None:
            module.requires_grad_(False)


def add_lora(model, rank: int = 64, alpha: int = 16, dropout: float = 0.05):
    """LoRA adapters on every attention and MLP projection of the LM (the reference's settings)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ModuleNotFoundError("LoRA fine-tuning needs peft: pip install 'gpa-hf[lora]'") from error
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


class GpaTrainer(Trainer):
    """`Trainer` with two options for GPA's training batches.

    - `semantic_input_noise`: replaces some semantic input tokens of training batches (`add_semantic_input_noise`),
      in `training_step` only, so evaluation losses are computed on clean sequences.
    - `micro_batches_by_length`: runs each training batch as this many micro-batches of rows of similar length, each
      padded only to its own longest row. The batch is the same and so is its gradient (each micro-batch's loss is
      divided by the whole batch's target count, `num_items_in_batch`), but random batches of GPA's mixed tasks
      are 35-43% padding, which a CPU computes in full. Unlike `group_by_length`, it does not change which rows
      train together. Used only where the Trainer passes `num_items_in_batch` (models that take loss kwargs, as
      GPA does); otherwise batches run whole.
    """

    def __init__(
        self,
        *args,
        layout: GpaVocabularyLayout,
        semantic_input_noise: float = 0.0,
        micro_batches_by_length: int = 1,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if micro_batches_by_length < 1:
            raise ValueError(f"micro_batches_by_length must be at least 1, got {micro_batches_by_length}")
        self.layout = layout
        self.semantic_input_noise = semantic_input_noise
        self.micro_batches_by_length = micro_batches_by_length

    def training_step(self, model, inputs, *args, **kwargs):
        if self.semantic_input_noise > 0:
            inputs = dict(inputs)
            inputs["input_ids"] = add_semantic_input_noise(
                inputs["input_ids"], inputs["labels"], self.layout, self.semantic_input_noise
            )
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or num_items_in_batch is None or self.micro_batches_by_length == 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        compute_loss = super().compute_loss
        micro_batches = split_batch_by_length(inputs, self.micro_batches_by_length)
        return sum(compute_loss(model, part, num_items_in_batch=num_items_in_batch) for part in micro_batches)


def split_batch_by_length(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A right-padded batch (`attention_mask`) as up to `parts` batches of rows of similar length, each cut to its
    own longest row: every row appears once, and only padding is removed."""
    lengths = batch["attention_mask"].sum(-1)
    micro_batches = []
    for rows in lengths.argsort(stable=True).tensor_split(min(parts, len(lengths))):
        longest = int(lengths[rows].max())
        micro_batches.append(
            {key: value[rows, :longest] if value.dim() > 1 else value[rows] for key, value in batch.items()}
        )
    return micro_batches


def build_trainer(
    model,
    processor,
    dataset,
    output_dir: str,
    eval_fraction: float = 0.05,
    seed: int = 0,
    semantic_input_noise: float = 0.0,
    activation_checkpointing: bool = False,
    micro_batches_by_length: int = 1,
    **training_kwargs,
) -> GpaTrainer:
    """A `GpaTrainer` over a prepared dataset, with a held-out split when there are enough rows for one.

    `training_kwargs` override the `TrainingArguments` defaults (the reference's optimiser settings).
    `activation_checkpointing` is passed under the name this transformers version knows (older ones call it
    `gradient_checkpointing`, which newer ones deprecate).
    `micro_batches_by_length` splits each batch to pad less, same gradient (see [`GpaTrainer`]).
    """
    freeze_audio_tokenizers(model)
    dataset = dataset.select_columns(["input_ids", "labels"])
    eval_dataset = None
    held_out = round(len(dataset) * eval_fraction)
    if held_out >= 1 and len(dataset) - held_out >= 1:
        split = dataset.train_test_split(test_size=held_out, seed=seed)
        dataset, eval_dataset = split["train"], split["test"]
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    defaults = {
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.005,
        "weight_decay": 0.005,
        "adam_beta2": 0.95,
        "num_train_epochs": 2,
        "logging_steps": 10,
        "save_strategy": "epoch",
        "save_total_limit": 3,
        "eval_strategy": "epoch" if eval_dataset is not None else "no",
        "bf16": use_bf16,
        "report_to": "none",
        "dataloader_pin_memory": torch.cuda.is_available(),
        "seed": seed,
    }
    if activation_checkpointing:
        renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        defaults["activation_checkpointing" if renamed else "gradient_checkpointing"] = True
    arguments = TrainingArguments(output_dir=output_dir, **{**defaults, **training_kwargs})
    return GpaTrainer(
        model=model,
        layout=model.config.layout,
        semantic_input_noise=semantic_input_noise,
        micro_batches_by_length=micro_batches_by_length,
        args=arguments,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=GpaDataCollator(processor.pad_token_id, pad_to_multiple_of=8 if use_bf16 else None),
        processing_class=processor,
    )


__all__ = ["LORA_TARGETS", "GpaTrainer", "add_lora", "build_trainer", "freeze_audio_tokenizers", "load_training_data"]
