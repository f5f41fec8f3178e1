"""Convert the published GPA folder (LM + tokenizer at the root, `BiCodec/`, `glm-4-voice-tokenizer/`) into one
gpa-hf folder that `from_pretrained` loads and `push_to_hub` shares.

    python -m gpa_hf.convert_gpa_original_to_hf --input_dir GPA --output_dir gpa-hf --default_voice voice.wav
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3Config

from .audio_utils import AudioInput
from .configuration_gpa import TASKS, GpaConfig, GpaVocabularyLayout
from .convert_codecs import (
    BICODEC_DIR,
    GLM_TOKENIZER_DIR,
    check_state_dict,
    load_original_bicodec,
    load_original_glm_tokenizer,
)
from .feature_extraction_gpa import GpaFeatureExtractor
from .generation_gpa import build_generation_config
from .modeling_gpa import GpaForConditionalGeneration
from .processing_gpa import GpaProcessor, GpaVoice

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "gpa.md"


def is_original_layout(path: str | Path) -> bool:
    """A published-layout GPA folder is recognised by `BiCodec/config.yaml`."""
    return (Path(path) / BICODEC_DIR / "config.yaml").is_file()


def _load_lm_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no model*.safetensors with the LM weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_original_gpa(
    folder: str | Path, tasks: list[str] | tuple[str, ...] = TASKS, dtype: torch.dtype = torch.float32
) -> tuple[GpaForConditionalGeneration, GpaProcessor]:
    """Build a [`GpaForConditionalGeneration`] and [`GpaProcessor`] from the published folder layout."""
    folder = Path(folder)
    if not is_original_layout(folder):
        raise ValueError(f"{folder}: not a published GPA folder (expected {BICODEC_DIR}/config.yaml)")
    lm_config = json.loads((folder / "config.json").read_text())
    for key in ("auto_map", "architectures", "model_type", "transformers_version"):
        lm_config.pop(key, None)
    lm_config = Qwen3Config(**lm_config).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        lm_config.pop(key, None)
    needs_encoders = "asr" in tasks or "vc" in tasks
    bicodec, bicodec_features = load_original_bicodec(folder / BICODEC_DIR, include_semantic_encoder=needs_encoders)
    glm, glm_features = load_original_glm_tokenizer(folder / GLM_TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    layout = GpaVocabularyLayout.from_tokenizer(tokenizer, bicodec.config, glm.config)
    layout.validate(lm_config["vocab_size"])
    config = GpaConfig(
        **lm_config,
        bicodec_config=bicodec.config.to_dict(),
        speech_tokenizer_config=glm.config.to_dict(),
        vocabulary_layout=layout.to_dict(),
        tasks=list(tasks),
        architectures=["GpaForConditionalGeneration"],
    )
    model = GpaForConditionalGeneration(config)
    lm_state = _load_lm_state_dict(folder)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(("bicodec.", "speech_tokenizer."))}
    if config.tie_word_embeddings:  # the output layer is the embedding; a stored copy is redundant
        expected.pop("lm_head.weight")
        lm_state.pop("lm_head.weight", None)
    check_state_dict(expected, lm_state, str(folder / "model*.safetensors"))
    model.load_state_dict(lm_state, strict=False)
    model.bicodec.load_state_dict(bicodec.state_dict())
    if model.speech_tokenizer is not None:
        model.speech_tokenizer.load_state_dict(glm.state_dict())
    model.tie_weights()
    model.to(dtype)
    model.bicodec.float()
    if model.speech_tokenizer is not None:
        model.speech_tokenizer.float()
    model.generation_config = build_generation_config(layout, tokenizer.pad_token_id)
    model.eval()
    feature_extractor = GpaFeatureExtractor.from_codec_feature_extractors(bicodec_features, glm_features)
    processor = GpaProcessor(feature_extractor, tokenizer, vocabulary_layout=layout.to_dict())
    return model, processor


def voice_from_audio(model: GpaForConditionalGeneration, processor: GpaProcessor, audio: AudioInput) -> GpaVoice:
    """The voice (global tokens) of one reference recording."""
    reference = processor.feature_extractor.reference_features([audio])["reference_values"]
    return model.create_voice(reference)[0]


def write_model_card(output_dir: Path, name: str, source: str) -> None:
    card = MODEL_CARD_TEMPLATE.read_text().replace("{model_name}", name).replace("{source}", source)
    (output_dir / "README.md").write_text(card)


def convert_gpa_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    default_voice: AudioInput | None = None,
    lm_only_dir: str | Path | None = None,
    model_name: str = "GPA",
) -> tuple[GpaForConditionalGeneration, GpaProcessor]:
    """Published folder -> gpa-hf folder (weights, tokenizer, processor, generation config, voice, model card)."""
    output_dir = Path(output_dir)
    model, processor = load_original_gpa(input_dir)
    if default_voice is not None:
        processor.default_voice = (
            GpaVoice.load(default_voice)
            if isinstance(default_voice, (str, Path)) and GpaVoice.is_voice_file(default_voice)
            else voice_from_audio(model, processor, default_voice)
        )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    write_model_card(output_dir, model_name, str(input_dir))
    if lm_only_dir is not None:
        save_lm_only(model, processor, lm_only_dir)
    return model, processor


def save_lm_only(model: GpaForConditionalGeneration, processor: GpaProcessor, output_dir: str | Path) -> None:
    """The LM alone as a plain Qwen3 folder (for vLLM, SGLang or llama.cpp serving) with the text tokenizer."""
    from transformers import Qwen3ForCausalLM

    lm = Qwen3ForCausalLM(model.config.lm_config())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("bicodec.", "speech_tokenizer."))}
    lm.load_state_dict(state, strict=True)
    lm.generation_config = model.generation_config
    lm.save_pretrained(output_dir)
    processor.tokenizer.save_pretrained(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="the published GPA folder")
    parser.add_argument("--output_dir", required=True, help="where to write the gpa-hf folder")
    parser.add_argument("--default_voice", help="audio file (or .voice file) whose voice becomes the default")
    parser.add_argument("--lm_only_dir", help="also write the LM alone as a plain Qwen3 folder here")
    args = parser.parse_args(argv)
    convert_gpa_checkpoint(args.input_dir, args.output_dir, args.default_voice, args.lm_only_dir)


if __name__ == "__main__":
    main()
