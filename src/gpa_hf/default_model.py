"""The embedded default model, gpa-tiny: a small GPA trained by `examples/gpa_tiny`, shipped inside the package.

It loads offline, so every command and pipeline works right after installation when no model is named.
"""

from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).with_name("gpa_tiny"))

__all__ = ["DEFAULT_MODEL"]
