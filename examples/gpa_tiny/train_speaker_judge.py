"""Train an independent speaker judge for `gpa-hf eval --speaker-model`: a small x-vector model on the corpus.

    python examples/gpa_tiny/train_speaker_judge.py --corpus gpa_tiny_work/corpus --output-dir speaker-judge
    gpa-hf eval gpa-tiny gpa_tiny_work/corpus/heldout_vc.jsonl --task vc --output vc.json --speaker-model speaker-judge

By default `gpa-hf eval` scores voices with the evaluated model's own BiCodec speaker encoder, the same encoder
whose d-vector the decoder is conditioned on, so a decoder can please it without sounding more like the voice (a
wave generator fine-tuned against it lifted gpa-tiny's VC score from 69% to 90% while the pitch check stayed at
72-74%). This judge shares nothing with the model: transformers' `Wav2Vec2BertForXVector` (conformer layers on
log-mel filter banks, a TDNN x-vector head), trained from scratch on the corpus's training voices' real clips only
(never on decoded audio) to tell those voices apart, through a softmax layer on its x-vectors as x-vectors were
first trained (the model's own additive-margin objective, scale 30 and margin 0.4, stayed at chance level from
scratch at this size; it is left unused). A tenth of the training voices is kept out of its training to check it
on voices it never heard: for the corpus's voice-conversion rows whose target voice is one of those, espeak-ng's
clip of the source text in the target voice must be closer to a clip of the target voice than to the source clip
(same content as the source: the hardest case for a judge that hears content).
The folder it writes (model and feature extractor) loads with `AutoModelForAudioXVector`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertForXVector

from gpa_hf.audio_utils import load_audio
from gpa_hf.evaluation_gpa import TransformersSpeakerEmbedder, cosine_similarity

CROP_SAMPLES = 32000  # 2 s of each clip per step (digit strings are 1-4 s)


def judge_config(num_speakers: int) -> Wav2Vec2BertConfig:
    """A 0.9 M-parameter x-vector model: small enough to train in minutes on 2 cores."""
    return Wav2Vec2BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        feature_projection_input_dim=160,  # 80 mel bins, two frames stacked (SeamlessM4TFeatureExtractor)
        add_adapter=False,
        tdnn_dim=(128, 128, 128, 128, 384),
        tdnn_kernel=(5, 3, 3, 1, 1),
        tdnn_dilation=(1, 2, 3, 1, 1),
        xvector_output_dim=128,
        num_labels=num_speakers,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )


def split_speakers(speakers: list[str], every: int = 10) -> tuple[list[str], set[str]]:
    """Every `every`-th voice (sorted by name) is kept out of training, for checking the judge on unheard voices."""
    ordered = sorted(speakers)
    unheard = set(ordered[::every])
    return [s for s in ordered if s not in unheard], unheard


def crop(waveform: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random `CROP_SAMPLES` of a longer clip (the voice, not the words, must be what stays constant)."""
    if waveform.shape[0] <= CROP_SAMPLES:
        return waveform
    start = rng.randint(0, waveform.shape[0] - CROP_SAMPLES)
    return waveform[start : start + CROP_SAMPLES]


def unheard_voice_check(embed, rows: list[dict], speaker_of: dict[str, str], unheard: set[str], folder: Path) -> dict:
    """How often the target voice's rendition of the source text is closer to the target voice than to the source."""
    pairs = [row for row in rows if row["task"] == "vc" and speaker_of.get(row["ref_audio"]) in unheard]
    if not pairs:
        raise ValueError("no voice-conversion row of the corpus has an unheard target voice to check the judge on")
    closer = []
    for start in range(0, len(pairs), 32):
        batch = pairs[start : start + 32]
        rendition, target, source = (
            embed([load_audio(folder / row[column]) for row in batch]) for column in ("vc_audio", "ref_audio", "audio")
        )
        closer += (cosine_similarity(rendition, target) > cosine_similarity(rendition, source)).tolist()
    return {"pairs": len(closer), "closer_to_target_rate": float(np.mean(closer))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the corpus folder of the gpa-tiny recipe (train.jsonl)")
    parser.add_argument("--output-dir", default="speaker-judge")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    folder = Path(args.corpus)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    clips = [row for row in rows if row["task"] == "stt"]
    unnamed = sum("speaker" not in row for row in clips)
    if unnamed or not clips:
        raise ValueError(
            f"{folder / 'train.jsonl'}: needs stt rows that name their speaker (the gpa-tiny corpus writes them); "
            f"got {len(clips)} stt rows, {unnamed} without a speaker"
        )
    speaker_of = {row["audio"]: row["speaker"] for row in clips}
    speakers, unheard = split_speakers(list({row["speaker"] for row in clips}))
    training = [row for row in clips if row["speaker"] in speakers]
    print(f"{len(training)} clips of {len(speakers)} voices; {len(unheard)} voices kept out for the check", flush=True)
    labels = {speaker: index for index, speaker in enumerate(speakers)}
    waveforms = [load_audio(folder / row["audio"]) for row in training]

    features = SeamlessM4TFeatureExtractor()
    model = Wav2Vec2BertForXVector(judge_config(len(speakers))).train()
    classifier = torch.nn.Linear(model.config.xvector_output_dim, len(speakers))
    parameters = [*model.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.steps, pct_start=0.05
    )
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = rng.sample(range(len(training)), args.batch_size)
        inputs = features(
            [crop(waveforms[i], rng) for i in batch],
            sampling_rate=16000,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        logits = classifier(model(**inputs).embeddings)
        targets = torch.tensor([labels[training[i]["speaker"]] for i in batch])
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == 1:
            print(
                f"[speaker judge] step {step}/{args.steps}  loss {loss.item():.3f}  accuracy "
                f"{(logits.argmax(-1) == targets).float().mean().item():.2f}  "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    model.eval()
    output = Path(args.output_dir)
    model.save_pretrained(output)
    features.save_pretrained(output)
    check = unheard_voice_check(TransformersSpeakerEmbedder(str(output)), rows, speaker_of, unheard, folder)
    (output / "judge_check.json").write_text(json.dumps({"unheard_voices": sorted(unheard), **check}, indent=2))
    print(f"saved {output}; on unheard voices: {json.dumps(check)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
