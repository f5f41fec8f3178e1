"""All three GPA tasks through transformers pipelines.

    F=tests/fixtures/tiny
    gpa-hf convert $F/checkpoint_original_layout tiny-gpa --default-voice $F/audio/astro.wav
    python examples/quickstart.py tiny-gpa $F/audio/000.wav

With the tiny random-weight fixture the outputs are noise and gibberish of plausible length; with a converted
published checkpoint they are speech and text.
"""

from __future__ import annotations

import argparse

from transformers import pipeline

import gpa_hf  # noqa: F401  (registers GPA with the Auto classes and pipelines)
from gpa_hf import write_wav


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a gpa-hf folder or Hub id")
    parser.add_argument("audio", help="a speech recording (any format, rate and channel count)")
    parser.add_argument("--text", default="Hello from GPA. This sentence is spoken by a transformers pipeline.")
    args = parser.parse_args()

    tts = pipeline("text-to-speech", model=args.model)
    speech = tts(args.text)
    write_wav("tts.wav", speech["audio"], speech["sampling_rate"])
    cloned = tts(args.text, voice=args.audio)
    write_wav("tts_cloned.wav", cloned["audio"], cloned["sampling_rate"])

    asr = pipeline("automatic-speech-recognition", model=args.model)
    print("transcript:", asr(args.audio)["text"])

    vc = pipeline("voice-conversion", model=args.model)
    converted = vc(args.audio, voice="tts.wav")
    write_wav("vc.wav", converted["audio"], converted["sampling_rate"])
    print("wrote tts.wav, tts_cloned.wav, vc.wav")


if __name__ == "__main__":
    main()
