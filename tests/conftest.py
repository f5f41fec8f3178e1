"""Shared fixtures: the reference's tiny checkpoint and golden outputs, copied into tests/fixtures/tiny."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, gpa-hf's Triton kernels (gpu_kernels) run in Triton's interpreter, which has to be chosen before
# anything imports triton (transformers does): its own helpers (`tl.sum`...) are defined at that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The fixture checkpoint converted to a gpa-hf folder, with astro.wav as its default voice."""
    from gpa_hf.convert_gpa_original_to_hf import convert_gpa_checkpoint

    folder = tmp_path_factory.mktemp("gpa")
    convert_gpa_checkpoint(ORIGINAL_CHECKPOINT, folder, default_voice=str(AUDIO / "astro.wav"))
    return folder


@pytest.fixture(scope="session")
def gpa(converted):
    from gpa_hf import GpaForConditionalGeneration, GpaProcessor

    model = GpaForConditionalGeneration.from_pretrained(converted).eval()
    return model, GpaProcessor.from_pretrained(converted)


@pytest.fixture
def two_threads():
    """Two intra-op threads, as on the 2-core machines the CPU paths are tuned for (the gpa-tiny recipe sets them
    itself); later tests get back the count they had."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
