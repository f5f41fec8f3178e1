"""An offline, multi-speaker English speech corpus from espeak-ng: digit strings with exact transcripts.

Domain: 1 to 6 digits spoken as words ("three one four"). Speakers: espeak-ng English voices x voice variants
(male, female, croaky, ...) x pitch, each a fixed combination; utterances vary in speed. Training and held-out
utterances never share a text; held-out speakers are kept apart too, so the held-out set is new text from unseen
voices.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gpa_hf.audio_utils import load_audio, write_wav

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "klatt3"]
PITCHES = [35, 50, 65]


@dataclass(frozen=True)
class Speaker:
    voice: str
    variant: str
    pitch: int

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}-p{self.pitch}"

    @classmethod
    def from_name(cls, name: str) -> Speaker:
        """The speaker `name` stands for ("en-gb-scotland+f2-p35")."""
        voice, _, rest = name.partition("+")
        variant, _, pitch = rest.rpartition("-p")
        if not (voice and variant and pitch.isdigit()):
            raise ValueError(f"not a corpus speaker name: {name!r} (expected VOICE+VARIANT-pPITCH)")
        return cls(voice, variant, int(pitch))


def require_espeak() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng (Debian / Ubuntu)")
    return binary


def synthesize(binary: str, speaker: Speaker, text: str, speed: int, path: Path) -> None:
    """Speak `text` with espeak-ng and store it as 16 kHz mono float WAV."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        voice = f"{speaker.voice}+{speaker.variant}"
        subprocess.run(
            [binary, "-v", voice, "-p", str(speaker.pitch), "-s", str(speed), "-w", raw.name, text],
            check=True,
            capture_output=True,
        )
        write_wav(path, load_audio(raw.name))


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 6)))


def build_corpus(
    folder: str | Path,
    train_utterances: int = 4000,
    heldout_utterances: int = 120,
    seed: int = 0,
    reuse: bool = False,
) -> dict[str, Path]:
    """Synthesise the corpus into `folder`; returns the jsonl files (train, held-out asr / tts / vc, and
    `heldout_clips`: every held-out clip's text, speaker and speaking rate, to speak it again in another voice).

    With `reuse`, a corpus already complete in `folder` (made with the same settings) is kept as it is.
    """
    folder = Path(folder)
    names = ("train", "heldout_asr", "heldout_tts", "heldout_vc", "heldout_clips")
    files = {name: folder / f"{name}.jsonl" for name in names}
    settings = {
        "train_utterances": train_utterances,
        "heldout_utterances": heldout_utterances,
        "seed": seed,
        "rows": "stt rows name their speaker; heldout_clips",
    }
    done = folder / "settings.json"
    if reuse and done.is_file() and json.loads(done.read_text()) == settings:
        print(f"reusing the corpus in {folder}")
        return files
    binary = require_espeak()
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    speakers = [Speaker(v, a, p) for v in VOICES for a in VARIANTS for p in PITCHES]
    rng.shuffle(speakers)
    heldout_speakers, train_speakers = speakers[:24], speakers[24:]
    heldout_texts: set[str] = set()
    while len(heldout_texts) < heldout_utterances:
        heldout_texts.add(random_text(rng))

    def utterances(count: int, pool: list[Speaker], texts: set[str] | None, split: str) -> list[dict]:
        rows = []
        for index in tqdm(range(count), desc=f"espeak-ng {split}"):
            text = rng.choice(sorted(texts)) if texts is not None else random_text(rng)
            while texts is None and text in heldout_texts:
                text = random_text(rng)
            speaker = rng.choice(pool)
            path = folder / "wav" / f"{split}_{index:05d}.wav"
            speed = rng.randint(130, 190)
            synthesize(binary, speaker, text, speed, path)
            audio = str(path.relative_to(folder))
            rows.append({"audio": audio, "text": text, "speaker": speaker.name, "speed": speed})
        return rows

    train = utterances(train_utterances, train_speakers, None, "train")
    heldout = utterances(heldout_utterances * 2, heldout_speakers, heldout_texts, "heldout")
    by_speaker: dict[str, list[dict]] = {}
    for row in train:
        by_speaker.setdefault(row["speaker"], []).append(row)

    # Training rows: ASR on every clip (with its speaker, for the codec's speaker loss); TTS with another clip of
    # the same speaker as the voice; VC between two speakers saying the same text, made by speaking the text again
    # in the target voice.
    jsonl_rows = []
    for row in train:
        others = [r for r in by_speaker[row["speaker"]] if r is not row] or [row]
        jsonl_rows.append({"task": "stt", "audio": row["audio"], "text": row["text"], "speaker": row["speaker"]})
        jsonl_rows.append(
            {"task": "tts-a", "audio": row["audio"], "text": row["text"], "ref_audio": rng.choice(others)["audio"]}
        )
    vc_pairs = []
    for index, row in enumerate(tqdm(train[: len(train) // 2], desc="espeak-ng vc targets")):
        target = rng.choice([s for s in train_speakers if s.name != row["speaker"]])
        path = folder / "wav" / f"vc_{index:05d}.wav"
        synthesize(binary, target, row["text"], rng.randint(130, 190), path)
        voice_rows = by_speaker.get(target.name) or [{"audio": str(path.relative_to(folder))}]
        vc_pairs.append(
            {
                "task": "vc",
                "audio": row["audio"],
                "vc_audio": str(path.relative_to(folder)),
                "ref_audio": rng.choice(voice_rows)["audio"],
            }
        )
    jsonl_rows += vc_pairs
    rng.shuffle(jsonl_rows)

    write_jsonl(files["train"], jsonl_rows)
    first, second = heldout[: len(heldout) // 2], heldout[len(heldout) // 2 :]
    write_jsonl(files["heldout_asr"], [{"task": "stt", "audio": r["audio"], "text": r["text"]} for r in first])
    write_jsonl(
        files["heldout_tts"],
        [{"task": "tts-a", "text": a["text"], "ref_audio": b["audio"]} for a, b in zip(first, second)],
    )
    write_jsonl(
        files["heldout_vc"],
        [
            {"task": "vc", "audio": a["audio"], "ref_audio": b["audio"]}
            for a, b in zip(first, second)
            if a["speaker"] != b["speaker"]
        ],
    )
    write_jsonl(files["heldout_clips"], heldout)
    (folder / "speakers.json").write_text(
        json.dumps({"train": [s.name for s in train_speakers], "heldout": [s.name for s in heldout_speakers]})
    )
    done.write_text(json.dumps(settings))
    return files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
