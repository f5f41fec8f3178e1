"""The one audio loader of gpa-hf: any input becomes mono float32 at the model's sampling rate.

Both audio tokenizers (BiCodec and the GLM-4-Voice tokenizer) read audio through `load_audio`, so the two token
streams of one prompt always see the same samples.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf
import soxr
import torch

AudioInput = str | os.PathLike | np.ndarray | torch.Tensor | Mapping[str, Any]
"""A path, an array (with a sampling rate), or a `datasets` Audio dict (`array` or `raw` + `sampling_rate`, or
`path`)."""

RESAMPLE_QUALITY = "VHQ"


class MissingAudioError(ValueError):
    """An audio path that names no file."""


def _describe(audio: Any) -> str:
    if isinstance(audio, (str, os.PathLike)):
        return f"file {os.fspath(audio)!r}"
    if isinstance(audio, Mapping) and audio.get("path"):
        return f"audio {audio['path']!r}"
    return f"{type(audio).__name__} input"


def _to_mono(samples: np.ndarray, name: str) -> np.ndarray:
    """Average the channels. 2-D input is laid out either way round: the shorter axis is the channel axis."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise ValueError(
            f"{name}: expected a 1-D (samples) or 2-D (channels, samples) array, got shape {samples.shape}"
        )
    channel_axis = 0 if samples.shape[0] <= samples.shape[1] else 1
    return samples.mean(axis=channel_axis)


def _read_file(source: Any, name: str, start_time: float | None, end_time: float | None) -> tuple[np.ndarray, int]:
    if isinstance(source, str) and not os.path.isfile(source):
        raise MissingAudioError(f"{name}: no such file")
    try:
        info = sf.info(source)
        if isinstance(source, io.BytesIO):
            source.seek(0)
        start = round(start_time * info.samplerate) if start_time is not None and start_time > 0 else 0
        stop = round(end_time * info.samplerate) if end_time is not None and end_time > 0 else None
        if stop is not None and stop <= start:
            raise ValueError(f"{name}: end_time {end_time} s must be after begin_time {start_time} s")
        samples, sampling_rate = sf.read(source, start=start, stop=stop, dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise ValueError(f"{name}: cannot be read as audio ({error})") from error
    return samples.T, sampling_rate


def load_audio(
    audio: AudioInput,
    sampling_rate: int | None = None,
    target_sampling_rate: int = 16000,
    start_time: float | None = None,
    end_time: float | None = None,
) -> np.ndarray:
    """Decode, downmix and resample any supported audio input to mono float32 at `target_sampling_rate`.

    Args:
        audio: a path to any file soundfile reads (wav, flac, mp3, ogg/opus, ...), a numpy array or torch tensor
            (1-D, or 2-D with a channel axis), or a `datasets` Audio dict.
        sampling_rate: the rate of an array input. Required for arrays: a wrong rate silently changes the pitch.
        start_time, end_time: optional segment of a file in seconds (`None`, or a negative value, means the whole
            file), read without decoding the rest of a long recording.
    """
    name = _describe(audio)
    if isinstance(audio, Mapping):
        array = audio.get("array", audio.get("raw"))  # `raw`: the stock ASR pipeline's name
        if array is not None:
            return load_audio(array, audio.get("sampling_rate"), target_sampling_rate, start_time, end_time)
        if audio.get("bytes") is not None:
            samples, sampling_rate = _read_file(io.BytesIO(audio["bytes"]), name, start_time, end_time)
        elif audio.get("path"):
            samples, sampling_rate = _read_file(audio["path"], name, start_time, end_time)
        else:
            raise ValueError(f"{name}: an audio dict needs 'array' (or 'raw') + 'sampling_rate', 'bytes' or 'path'")
    elif isinstance(audio, (str, os.PathLike)):
        samples, sampling_rate = _read_file(os.fspath(audio), name, start_time, end_time)
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise ValueError(
                f"{name}: the sampling rate of an array cannot be known; pass sampling_rate= (for example 16000)"
            )
        samples = audio.detach().cpu().float().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"{name}: expected floating-point samples in [-1, 1], got dtype {samples.dtype}")
        samples = samples.astype(np.float64)
        if (start_time is not None and start_time > 0) or (end_time is not None and end_time > 0):
            start = round(max(start_time or 0.0, 0.0) * sampling_rate)
            stop = round(end_time * sampling_rate) if end_time is not None and end_time > 0 else None
            samples = samples[..., start:stop]
    elif hasattr(audio, "get_all_samples"):  # datasets >= 4 decodes Audio columns to torchcodec AudioDecoder objects
        decoded = audio.get_all_samples()
        return load_audio(decoded.data, decoded.sample_rate, target_sampling_rate, start_time, end_time)
    else:
        raise ValueError(f"unsupported audio input of type {type(audio).__name__}: expected a path, array or dict")

    samples = _to_mono(samples, name)
    if samples.size == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise ValueError(f"{name}: the audio contains NaN or infinite samples")
    if sampling_rate is None or sampling_rate <= 0:
        raise ValueError(f"{name}: invalid sampling rate {sampling_rate}")
    if sampling_rate != target_sampling_rate:
        samples = soxr.resample(samples, sampling_rate, target_sampling_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(samples, dtype=np.float32)


PAUSE_FRAME_SECONDS = 0.01
PAUSE_MIN_SECONDS = 0.3  # a silence this long between two stretches of sound ends an utterance
PAUSE_DEPTH_DB = 35.0  # silence: this far below the recording's loud frames (its 95th percentile)
QUIET_WINDOW_SECONDS = 0.2  # power averaged over this long, so that a pause outranks a quiet sound in a word
QUIET_TOLERANCE_DB = 1.0


class AudioSpan(NamedTuple):
    """Samples `start` to `stop` of a recording; `silent` when every 10 ms of it is silence (see `split_at_pauses`)."""

    start: int
    stop: int
    silent: bool


def split_at_pauses(waveform: np.ndarray, sampling_rate: int, max_seconds: float) -> list[AudioSpan]:
    """Cut a recording longer than `max_seconds` into utterances: consecutive spans of its samples.

    A model trained on single utterances fails on a long recording, and even on two utterances with a pause between
    them, so long audio is cut in the middle of every pause (0.3 s or more, 35 dB below the loud frames; silence
    before the first sound and after the last stays attached). An utterance still longer than `max_seconds` is cut
    where the power averaged over 0.2 s is lowest within the second half of what remains of its first `max_seconds`
    (the latest such point within 1 dB), and so on; its last piece is kept at least a quarter of `max_seconds` long.
    Such a cut can leave a span of silence alone (`silent`), which a caller need not send to a model.
    The spans cover every sample once, in order: nothing is dropped or repeated. A recording no longer than
    `max_seconds` stays whole.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    samples = np.asarray(waveform, dtype=np.float64).reshape(-1)
    total, longest = samples.size, max(1, int(max_seconds * sampling_rate))
    if total <= longest:
        return [AudioSpan(0, total, False)]
    hop = max(1, round(PAUSE_FRAME_SECONDS * sampling_rate))
    frames = -(-total // hop)
    power = np.pad(samples**2, (0, frames * hop - total)).reshape(frames, hop).mean(-1)
    level = 10 * np.log10(power + 1e-12)
    silent = level < np.percentile(level, 95) - PAUSE_DEPTH_DB
    edges = np.flatnonzero(np.diff(np.concatenate([[0], silent.astype(np.int8), [0]])))
    shortest_pause = round(PAUSE_MIN_SECONDS / PAUSE_FRAME_SECONDS)
    cuts = [
        (first + last) * hop // 2
        for first, last in edges.reshape(-1, 2)  # each pause: its first silent frame, the first frame after it
        if last - first >= shortest_pause and first > 0 and last < frames
    ]
    width = max(1, round(QUIET_WINDOW_SECONDS / PAUSE_FRAME_SECONDS))
    smoothed = 10 * np.log10(np.convolve(power, np.ones(width) / width, mode="same") + 1e-12)
    bounds = []
    for start, stop in zip([0, *cuts], [*cuts, total]):
        while stop - start > longest:
            first, last = start + longest // 2, min(start + longest, stop - longest // 4)
            candidates = np.arange(-(-first // hop), last // hop + 1)  # frames whose start lies in [first, last]
            cut = last
            if candidates.size:
                quiet = candidates[smoothed[candidates] <= smoothed[candidates].min() + QUIET_TOLERANCE_DB]
                cut = min(max(int(quiet[-1]) * hop + hop // 2, first), last)
            bounds.append((start, cut))
            start = cut
        bounds.append((start, stop))
    return [AudioSpan(start, stop, bool(silent[start // hop : -(-stop // hop)].all())) for start, stop in bounds]


def write_wav(path: str | os.PathLike, waveform: np.ndarray | torch.Tensor, sampling_rate: int = 16000) -> None:
    """Write a mono float32 WAV file."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().float().numpy()
    sf.write(os.fspath(path), np.asarray(waveform, dtype=np.float32).reshape(-1), sampling_rate, subtype="FLOAT")


def pitch_track(
    waveform: np.ndarray,
    sampling_rate: int = 16000,
    hop_length: int = 160,
    window_length: int = 640,
    min_hz: float = 60.0,
    max_hz: float = 400.0,
) -> np.ndarray:
    """Fundamental frequency (Hz) of frames centred every `hop_length` samples; 0 where a frame is unvoiced.

    Frame `j` is the `window_length` samples centred on `(j + 0.5) * hop_length` (zero past the clip's ends), one
    per started hop. Autocorrelation: a frame is voiced when it is within 30 dB of the clip's loudest frame and its
    autocorrelation peak between the `min_hz` and `max_hz` periods reaches half its energy. Clean speech (such as
    a synthetic corpus) is tracked well; it is a check and a training target, not a tool for noisy recordings.
    """
    samples = np.asarray(waveform, dtype=np.float64).reshape(-1)
    frames = -(-samples.size // hop_length)
    if frames == 0:
        return np.zeros(0, dtype=np.float32)
    half = window_length // 2
    padded = np.pad(samples, (half, frames * hop_length - samples.size + half))
    windows = np.lib.stride_tricks.sliding_window_view(padded, window_length)[hop_length // 2 :: hop_length][:frames]
    windows = windows - windows.mean(-1, keepdims=True)
    spectrum = np.fft.rfft(windows, 2 * window_length)
    autocorrelation = np.fft.irfft(spectrum * spectrum.conj(), 2 * window_length)[:, :window_length]
    shortest, longest = int(sampling_rate / max_hz), min(int(sampling_rate / min_hz), window_length - 1)
    lags = shortest + autocorrelation[:, shortest:longest].argmax(-1)
    rows = np.arange(frames)
    peaks = autocorrelation[rows, lags]
    # The period to a fraction of a sample (integer lags are 1% apart at 300 Hz): the peak of the autocorrelation
    # divided by its overlap (a short window's raw autocorrelation falls with the lag, pulling its peak short),
    # looked for within 2 lags of the raw peak, then a parabola through it and its neighbours.
    unbiased = autocorrelation * window_length / (window_length - np.arange(window_length))
    nearby = np.clip(lags[:, None] + np.arange(-2, 3), shortest, longest - 1)
    lags = nearby[rows, unbiased[rows[:, None], nearby].argmax(-1)]
    before, peak, after = (unbiased[rows, lags + step] for step in (-1, 0, 1))
    curvature = before - 2 * peak + after
    shift = np.where(curvature < 0, 0.5 * (before - after) / np.where(curvature < 0, curvature, -1.0), 0.0)
    energy = autocorrelation[:, 0]
    voiced = (energy > 1e-3 * energy.max()) & (peaks > 0.5 * energy) & (energy > 0)
    return np.where(voiced, sampling_rate / (lags + np.clip(shift, -0.5, 0.5)), 0.0).astype(np.float32)
