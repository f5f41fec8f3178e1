"""How gpa-tiny's speech recognition holds up on clips that sound recorded, and on long recordings.

    python examples/gpa_tiny/asr_robustness.py --corpus gpa_tiny_work/corpus --output robustness.json

The 100 held-out ASR clips of the corpus (built by `train_gpa_tiny.py`; espeak-ng starts and ends each clip with the
speech, at one level) are changed as a recording might change them, each change on all 100 clips from its own
seeded random stream, and transcribed the way `gpa-hf asr` transcribes (`run_requests`: audio longer than one
prompt is cut at its pauses). Prints and writes the character error rate per change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpa_tiny import echo_tail, telephone_band

from gpa_hf import DEFAULT_MODEL, GpaForConditionalGeneration, GpaProcessor
from gpa_hf.audio_utils import load_audio
from gpa_hf.evaluation_gpa import error_rate
from gpa_hf.processing_gpa import run_requests

SAMPLING_RATE = 16000
Change = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLING_RATE), dtype=np.float32)


def padded(before: float, after: float) -> Change:
    return lambda clip, _: np.concatenate([silence(before), clip, silence(after)])


def with_noise(decibels_below: float, change: Change | None = None) -> Change:
    """White noise `decibels_below` the clip's speech (its RMS before `change`), after `change`."""

    def noisy(clip: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        level = np.sqrt(np.mean(clip**2)) * 10 ** (-decibels_below / 20)
        changed = clip if change is None else change(clip, generator)
        return changed + level * generator.standard_normal(changed.size).astype(np.float32)

    return noisy


def quieter(decibels: float) -> Change:
    return lambda clip, _: clip * np.float32(10 ** (-decibels / 20))


def telephone(clip: np.ndarray, _: np.random.Generator) -> np.ndarray:
    """Sampled at 8 kHz and back: no energy above 4 kHz (the recipe's `telephone_band`)."""
    return telephone_band(clip)


def room(decay_seconds: float, decibels_above: float) -> Change:
    """An echo: a noise tail decaying by 60 dB over `decay_seconds`, `decibels_above` the direct sound's energy."""

    def echoed(clip: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        echo = echo_tail(generator, decay_seconds)
        echo *= 10 ** (decibels_above / 20) / np.sqrt(np.sum(echo**2))
        return (clip + np.convolve(clip, echo)[: clip.size]).astype(np.float32)

    return echoed


CHANGES: dict[str, Change] = {
    "the clips as espeak-ng made them": lambda clip, _: clip,
    "40 ms of silence before each": padded(0.04, 0.0),
    "0.2 s of silence before and after": padded(0.2, 0.2),
    "0.5 s of silence before and after, noise 50 dB below the speech": with_noise(50, padded(0.5, 0.5)),
    "1.0 s of silence before and after, noise 40 dB below": with_noise(40, padded(1.0, 1.0)),
    "26 dB quieter": quieter(26),
    "telephone band (resampled to 8 kHz and back)": telephone,
    "white noise 20 dB below the speech": with_noise(20),
    "a room: an echo with a 50 ms decay, as loud as the direct sound": room(0.05, 0.0),
    "a hall: an echo with a 0.3 s decay, 6 dB louder than the direct sound": room(0.3, 6.0),
}
LONG_RECORDINGS = "long recordings: four clips at a time, with 0.3-0.8 s pauses between them"


def long_recordings(clips: list[np.ndarray], texts: list[str], generator: np.random.Generator):
    """Consecutive clips four at a time, joined by pauses of 0.3-0.8 s: recordings longer than one prompt takes."""
    recordings, transcripts = [], []
    for start in range(0, len(clips) - 3, 4):
        parts = []
        for clip in clips[start : start + 4]:
            parts += [clip, silence(generator.uniform(0.3, 0.8))]
        recordings.append(np.concatenate(parts[:-1]))
        transcripts.append(" ".join(texts[start : start + 4]))
    return recordings, transcripts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the corpus folder of the gpa-tiny recipe")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a gpa-hf model folder (default: the embedded one)")
    parser.add_argument("--output", help="write the error rates (and every transcript) as JSON here")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows_file = Path(args.corpus) / "heldout_asr.jsonl"
    if not rows_file.is_file():
        raise ValueError(f"{rows_file}: no such file; --corpus takes the corpus folder that train_gpa_tiny.py built")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    clips = [load_audio(rows_file.parent / row["audio"]) for row in rows]
    texts = [row["text"] for row in rows]
    model = GpaForConditionalGeneration.from_pretrained(args.model, tasks=("asr",)).eval()
    processor = GpaProcessor.from_pretrained(args.model)

    def transcribe(waveforms: list[np.ndarray]) -> list[str]:
        return run_requests(model, processor, "asr", args.batch_size, audio=waveforms, sampling_rate=SAMPLING_RATE)

    conditions = {}
    for index, (name, change) in enumerate(CHANGES.items()):
        generator = np.random.default_rng([args.seed, index])
        conditions[name] = ([change(clip, generator).astype(np.float32) for clip in clips], texts)
    conditions[LONG_RECORDINGS] = long_recordings(clips, texts, np.random.default_rng([args.seed, len(CHANGES)]))
    report = {}
    print(f"{'held-out ASR, ' + str(len(clips)) + ' clips':74s} CER")
    for name, (waveforms, references) in conditions.items():
        predictions = transcribe(waveforms)
        report[name] = {
            "cer": error_rate(references, predictions, "char"),
            "items": [{"reference": r, "prediction": p} for r, p in zip(references, predictions)],
        }
        print(f"{name:74s} {report[name]['cer']:6.1%}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"model": args.model, "conditions": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
