"""Compile the fused decoding step's kernels for a GPU architecture with Triton's own compiler (no GPU needed).

    python tests/compile_gpu_kernels.py [--arch 90] [--batch 1] [--shapes published|tiny]

Builds one layer of the LM on the meta device (no memory), lists the step's launches as `GpaFusedDecodingStep`
makes them, compiles each launch to a cubin and prints, as JSON, its grid, registers per thread, the bytes it
spills to local memory (from `cuobjdump -res-usage`), its global loads by width and, for programmatic dependent
launches (sm_90 and later), its grid-dependency instructions and the global loads it issues before waiting (from the
PTX).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from types import SimpleNamespace

import torch
import triton
from transformers import Qwen3Config, Qwen3Model
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpa_hf import gpu_kernels

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.uint8: "u8"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature_of(kernel, arguments: tuple, options: dict) -> tuple[dict, dict, dict]:
    """Triton's signature, constants and attributes of a launch, as its JIT specializes them at run time: tensors
    16-byte aligned (every tensor the step passes is: allocations and the weight views it splits at row bounds)
    and integers divisible by 16 marked so, which is what lets the compiler use vector loads."""
    signature, constants, attributes = {}, {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, arguments)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i64"
            if value % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
    for name, value in options.items():
        if name not in LAUNCH_OPTIONS:
            signature[name] = "constexpr"
            constants[(kernel.arg_names.index(name),)] = value
    return signature, constants, attributes


# Options of a launch that are Triton's, not the kernel's constants.
LAUNCH_OPTIONS = ("num_warps", "launch_pdl")

# The decoder layer shapes of gpa-tiny and of the published LM (one layer is enough to list every kernel).
LAYER_SHAPES = {
    "tiny": {"hidden_size": 192, "intermediate_size": 576, "num_attention_heads": 4, "num_key_value_heads": 2},
    "published": {"hidden_size": 512, "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8},
}
HEAD_DIMS = {"tiny": 48, "published": 128}


def compile_step(arch: int, batch: int, shapes: str) -> dict:
    config = Qwen3Config(**LAYER_SHAPES[shapes], head_dim=HEAD_DIMS[shapes], num_hidden_layers=1)
    with torch.device("meta"):
        lm = Qwen3Model(config).to(torch.bfloat16)
    gpu_kernels.kernels_are_interpreted = lambda: True  # the launches are listed on the meta device, never run
    max_cache_len = 512
    step = gpu_kernels.GpaFusedDecodingStep(lm, batch, max_cache_len)
    step.dependent_launch = arch >= 90  # as on such a GPU: the step is built on the meta device here
    shape = (batch, config.num_key_value_heads, max_cache_len, config.head_dim)
    layer = SimpleNamespace(keys=torch.empty(shape, device="meta", dtype=torch.bfloat16))
    layer.values = layer.keys
    cache = SimpleNamespace(layers=[layer])
    index = torch.zeros(batch, dtype=torch.long, device="meta")
    attended = torch.zeros(batch, max_cache_len, dtype=torch.bool, device="meta")
    report = {}
    for number, (kernel, grid, arguments, options) in enumerate(step.launches(index, index[:1], attended, cache)):
        signature, constants, attributes = signature_of(kernel, arguments, options)
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes),
            target=GPUTarget("cuda", arch, 32),
            options={name: options[name] for name in LAUNCH_OPTIONS if name in options},
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
        registers = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
        spilled = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
        ptx = compiled.asm["ptx"]
        before, waits, _ = ptx.partition("griddepcontrol.wait")
        loads = re.findall(r"ld\.global\.(v\d\.)?b(\d+)", ptx)
        report[f"{number}:{kernel.__name__}"] = {
            "grid": list(grid),
            "registers": registers,
            "stack_bytes": spilled,
            # global loads by width: 16-bit ones read bf16 weights one number at a time
            "loads": {f"{vector or ''}b{bits}": loads.count((vector, bits)) for vector, bits in sorted(set(loads))},
            # programmatic dependent launch: the kernel waits for the previous one, then lets the next one start;
            # what it loads before the wait (the weights) overlaps the previous kernel
            "grid_dependency": re.findall(r"griddepcontrol\.(\w+)", ptx),
            "loads_before_wait": len(re.findall(r"ld\.global", before)) if waits else 0,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shapes", choices=sorted(LAYER_SHAPES), default="published", help="whose layer shapes")
    args = parser.parse_args()
    print(json.dumps(compile_step(args.arch, args.batch, args.shapes)))


if __name__ == "__main__":
    main()
