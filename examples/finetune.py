"""Fine-tune GPA with the stock `transformers.Trainer`.

    python examples/finetune.py MODEL DATA --output-dir OUT [--lora] [--epochs 2] [--eval-fraction 0.05]

MODEL is a gpa-hf folder, a Hub id or a published-layout folder; DATA is a reference-format jsonl file (tokenized
once with `prepare_dataset` and cached) or a folder written by `gpa-hf prepare-data`. Only the LM trains: the audio
tokenizers are frozen, since every prepared sequence was made with them. A held-out split is evaluated every epoch;
bf16 is used on GPUs that support it; `--lora` trains LoRA adapters through peft (`pip install gpa-hf[lora]`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import Trainer, TrainingArguments

from gpa_hf.cli import load_gpa
from gpa_hf.configuration_gpa import GpaVocabularyLayout
from gpa_hf.data_gpa import (
    DEFAULT_MAX_LENGTH,
    GpaDataCollator,
    add_semantic_input_noise,
    load_jsonl_dataset,
    prepare_dataset,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_training_data(model, processor, data: str, max_length: int = DEFAULT_MAX_LENGTH):
    """A prepared dataset: loaded from a `prepare-data` folder, or prepared (and cached) from a jsonl file."""
    if Path(data).is_dir():
        return load_from_disk(data)
    prepared, report = prepare_dataset(load_jsonl_dataset(data), model, processor, max_length=max_length)
    print(report)
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
        raise SystemExit("--lora needs peft: pip install 'gpa-hf[lora]'") from error
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


class GpaTrainer(Trainer):
    """`Trainer` that can replace some semantic input tokens of training batches (`add_semantic_input_noise`).

    The noise is added in `training_step` only, so evaluation losses are computed on clean sequences.
    """

    def __init__(self, *args, layout: GpaVocabularyLayout, semantic_input_noise: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = layout
        self.semantic_input_noise = semantic_input_noise

    def training_step(self, model, inputs, *args, **kwargs):
        if self.semantic_input_noise > 0:
            inputs = dict(inputs)
            inputs["input_ids"] = add_semantic_input_noise(
                inputs["input_ids"], inputs["labels"], self.layout, self.semantic_input_noise
            )
        return super().training_step(model, inputs, *args, **kwargs)


def build_trainer(
    model,
    processor,
    dataset,
    output_dir: str,
    eval_fraction: float = 0.05,
    seed: int = 0,
    semantic_input_noise: float = 0.0,
    **training_kwargs,
) -> GpaTrainer:
    """A `Trainer` over a prepared dataset, with a held-out split when there are enough rows for one."""
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
    arguments = TrainingArguments(output_dir=output_dir, **{**defaults, **training_kwargs})
    return GpaTrainer(
        model=model,
        layout=model.config.layout,
        semantic_input_noise=semantic_input_noise,
        args=arguments,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=GpaDataCollator(processor.pad_token_id, pad_to_multiple_of=8 if use_bf16 else None),
        processing_class=processor,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("data", help="reference-format jsonl, or a folder from gpa-hf prepare-data")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--group-by-length", action="store_true", help="batch rows of similar length together (less padding, faster)"
    )
    parser.add_argument(
        "--semantic-input-noise",
        type=float,
        default=0.0,
        help="probability that a semantic input token of a training sequence is replaced by another (its label "
        "stays): makes TTS and VC robust to their own sampling errors",
    )
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all LM weights")
    args = parser.parse_args()

    model, processor = load_gpa(args.model)
    dataset = load_training_data(model, processor, args.data, args.max_length)
    if args.lora:
        model = add_lora(model)
        model.print_trainable_parameters()
    trainer = build_trainer(
        model,
        processor,
        dataset,
        args.output_dir,
        eval_fraction=args.eval_fraction,
        semantic_input_noise=args.semantic_input_noise,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
    )
    trainer.train()
    final = trainer.model.merge_and_unload() if args.lora else trainer.model
    final.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"saved the fine-tuned model to {args.output_dir}")


if __name__ == "__main__":
    main()
