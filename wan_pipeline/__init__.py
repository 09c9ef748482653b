"""wan-bench: a pytest-based performance regression suite for the Wan 2.2 i2v A14B two-pass pipeline."""

__version__ = "0.1.0"
