"""gpa-hf's C++ CPU kernels, built on first use with the machine's C++ compiler (as `torch.compile` builds its own).

`gpa_hf::one_query_attention` (`csrc/one_query_attention.cpp`): a decoding step's attention over the KV cache at
memory speed, from float32 or bfloat16 caches. A CPU model with fused projections (`fuse_projections`, which the CLI
and `quantize_lm_dynamic_int8` apply) loads it where its cache is wide enough (`MIN_CACHE_WIDTH`), and so does a
compiled CPU step; once loaded, one-token steps of fused attention layers attend with it, eager or compiled (without
gradients). Everything else keeps SDPA.

`gpa_hf::int8_linear` (`csrc/int8_linear.cpp`): a torch.ao dynamic int8 linear layer's own packed product, called
by number (`register_int8_linear`), so that compiled CPU steps run the eager int8 layers' products (see
`GpaPackedInt8Linear`).

The build is for the machine's own CPU (`-march=native` on x86), and torch caches it (`TORCH_EXTENSIONS_DIR`, by
default under `~/.cache/torch_extensions`), so only a machine's first use compiles it (10-30 s); machines of other
CPUs sharing a home directory should each set their own `TORCH_EXTENSIONS_DIR`.
"""

from __future__ import annotations

import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("one_query_attention.cpp", "int8_linear.cpp")]
ONE_QUERY_GROUPS = (1, 2, 4, 8)  # queries per key-value head the kernel is built for
ONE_QUERY_MAX_HEAD_SIZE = 512

# Key and value numbers a token adds to the KV cache (all layers) from which a model's CPU steps load the kernel:
# the published LM's 28 layers x 8 heads x 128 x 2 = 57,344 make attention a third of a batched step; gpa-tiny's
# 4 x 2 x 48 x 2 = 768 make it too small for the first build (10-30 s) to pay.
MIN_CACHE_WIDTH = 8192

_built: bool | None = None  # None: not tried yet
_int8_linear_out_features: dict[int, int] = {}  # registered layer number -> its output size, for tracing


def cache_width(config) -> int:
    """Key and value numbers a token adds to the KV cache of a GPA (Qwen3) LM with this config, over all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim


def load_cpu_kernels() -> bool:
    """Build (once per machine) and load the kernels; False, with a warning that says why, where that fails."""
    global _built
    if _built is None:
        from torch.utils import cpp_extension

        flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
        try:
            if shutil.which("ninja") is None:  # torch builds with ninja: the `ninja` package's, where none is on PATH
                import ninja

                os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
            cpp_extension.load(
                "gpa_hf_cpu_kernels", [str(path) for path in SOURCES], extra_cflags=flags, is_python_module=False
            )
        except (OSError, RuntimeError, ImportError) as error:
            message = (
                "gpa-hf's CPU kernels could not be built, decoding steps attend with SDPA and compiled int8 steps "
                f"run oneDNN's products: {error}"
            )
            warnings.warn(message, stacklevel=2)
            _built = False
        else:
            torch.library.register_fake("gpa_hf::one_query_attention")(one_query_attention_shape)
            torch.library.register_fake("gpa_hf::int8_linear")(int8_linear_shape)
            _built = True
    return _built


def one_query_attention_shape(query, key, value, mask, scale) -> torch.Tensor:
    """The kernel's output for tracing: shape and dtype only."""
    return query.new_empty(query.shape)


def one_query_attention_supported(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the loaded kernel takes these one-token queries `(batch, heads, 1, dim)`, keys and mask."""
    return bool(
        _built
        and query.device.type == "cpu"
        and not query.requires_grad  # the kernel has no backward
        and query.shape[1] // key.shape[1] in ONE_QUERY_GROUPS
        and query.shape[3] <= ONE_QUERY_MAX_HEAD_SIZE
        and key.dtype in (torch.float32, torch.bfloat16)
        and (mask is None or (mask.dtype == torch.bool and mask.shape == (query.shape[0], 1, 1, key.shape[2])))
    )


def int8_linear_supported(layer: torch.nn.Module) -> bool:
    """Whether `layer`, a torch.ao dynamic linear layer, can run as `gpa_hf::int8_linear` (kernels loaded, int8)."""
    return bool(_built and layer._packed_params.dtype == torch.qint8)


def register_int8_linear(layer: torch.nn.Module) -> int:
    """The number under which `gpa_hf::int8_linear` runs this torch.ao dynamic int8 linear layer's packed product.

    The kernel holds the layer's packed weights (no copy) until `release_int8_linear`.
    """
    # What the layer's own forward passes: torch.ao's layers of version 4 and later quantize inputs to 7 bits.
    reduce_range = layer.version is not None and layer.version >= 4
    number = torch.ops.gpa_hf.register_int8_linear(layer._packed_params._packed_params, reduce_range)
    _int8_linear_out_features[number] = layer.out_features
    return number


def release_int8_linear(number: int) -> None:
    """Let the kernel drop a registered layer's packed weights; its number then raises."""
    torch.ops.gpa_hf.release_int8_linear(number)
    del _int8_linear_out_features[number]


def int8_linear_shape(hidden_states: torch.Tensor, number: int) -> torch.Tensor:
    """The product's output for tracing: shape and dtype only."""
    return hidden_states.new_empty(*hidden_states.shape[:-1], _int8_linear_out_features[number])
