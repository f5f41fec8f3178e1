"""Shared fixtures: the reference's tiny checkpoint and golden outputs, copied into tests/fixtures/tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
ORIGINAL_CHECKPOINT = TINY / "checkpoint_original_layout"
AUDIO = TINY / "audio"
CLIPS = ("000", "vc_src", "astro")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpa-samples"

torch.manual_seed(0)


@pytest.fixture(scope="session")
def expected() -> dict[str, torch.Tensor]:
    return load_file(TINY / "expected.safetensors")


@pytest.fixture(scope="session")
def expected_sequences() -> dict:
    return json.loads((TINY / "expected_sequences.json").read_text())


@pytest.fixture(scope="session")
def clip_paths() -> dict[str, str]:
    return {clip: str(AUDIO / f"{clip}.wav") for clip in CLIPS}


@pytest.fixture(scope="session")
def bicodec():
    from gpa_hf.convert_codecs import load_original_bicodec

    return load_original_bicodec(ORIGINAL_CHECKPOINT / "BiCodec")


@pytest.fixture(scope="session")
def glm_tokenizer():
    from gpa_hf.convert_codecs import load_original_glm_tokenizer

    return load_original_glm_tokenizer(ORIGINAL_CHECKPOINT / "glm-4-voice-tokenizer")
