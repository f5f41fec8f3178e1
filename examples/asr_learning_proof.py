"""Proof that GPA training works: a tiny GPA, trained from scratch on CPU, learns ASR on real clips.

    python examples/asr_learning_proof.py [--clips 12] [--epochs 120] [--report asr_learning_proof.json]

The audio tokenizers are those of the test fixture (`tests/fixtures/tiny/checkpoint_original_layout`); the LM is a
new, randomly initialised 4-layer Qwen3. It is trained with `gpa-hf finetune`'s Trainer set-up
(`gpa_hf.training_gpa`) on the first `tts-a` clips (English and Chinese) of
`../shared/data/gpa-samples/merged_shuffled_train.jsonl`, their transcripts as ASR targets, and the
character error rate on those clips is measured with `gpa-hf eval`'s code before and after. The script exits
non-zero unless CER goes from >= 90% to <= 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpa_hf import GpaConfig, GpaForConditionalGeneration
from gpa_hf.convert_gpa_original_to_hf import load_original_gpa
from gpa_hf.data_gpa import load_jsonl_dataset, prepare_dataset
from gpa_hf.evaluation_gpa import evaluate_gpa
from gpa_hf.training_gpa import build_trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_CHECKPOINT = ROOT / "tests" / "fixtures" / "tiny" / "checkpoint_original_layout"
SAMPLES = ROOT.parent / "shared" / "data" / "gpa-samples" / "merged_shuffled_train.jsonl"


def new_tiny_gpa(codec_source, hidden_size: int = 128, num_layers: int = 4, seed: int = 0):
    """A freshly initialised small LM around `codec_source`'s audio tokenizers (copied, frozen later)."""
    torch.manual_seed(seed)
    values = codec_source.config.to_dict()
    values.update(
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        layer_types=None,
        max_window_layers=num_layers,
    )
    model = GpaForConditionalGeneration(GpaConfig(**values))
    model.bicodec.load_state_dict(codec_source.bicodec.state_dict())
    model.speech_tokenizer.load_state_dict(codec_source.speech_tokenizer.state_dict())
    model.generation_config = codec_source.generation_config
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SAMPLES))
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=120)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--report", default="asr_learning_proof.json")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data}: the sample data is missing (expected ../shared/data beside the repository)")
    torch.set_num_threads(2)

    codec_source, processor = load_original_gpa(FIXTURE_CHECKPOINT)
    processor.max_source_seconds = None  # the LM learns each clip whole (up to 21 s), so it is asked about it whole
    model = new_tiny_gpa(codec_source)
    lm_parameters = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("bicodec", "speech")))
    rows = [row for row in load_jsonl_dataset(args.data) if row["task"] == "tts-a"][: args.clips]
    for row in rows:
        row["task"] = "stt"  # the TTS clips, used as speech -> text pairs
    before = evaluate_gpa(model, processor, rows, "asr")["metrics"]["cer"]

    from datasets import Dataset

    prepared, report = prepare_dataset(Dataset.from_list(rows), model, processor)
    print(report)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(
            model,
            processor,
            prepared,
            output_dir,
            eval_fraction=0.0,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=4,
            warmup_steps=0.05,
            weight_decay=0.0,
            logging_steps=20,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer.train()
    minutes = (time.perf_counter() - started) / 60
    model.eval()
    after_report = evaluate_gpa(model, processor, rows, "asr")
    after = after_report["metrics"]["cer"]
    summary = {
        "clips": len(rows),
        "lm_parameters": lm_parameters,
        "epochs": args.epochs,
        "training_minutes": round(minutes, 2),
        "cer_before": before,
        "cer_after": after,
        "items": after_report["items"],
    }
    Path(args.report).write_text(json.dumps(summary, ensure_ascii=False, indent=2))
    print(f"CER on the {len(rows)} training clips: {before:.1%} before, {after:.1%} after {minutes:.1f} min")
    return 0 if before >= 0.9 and after <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
