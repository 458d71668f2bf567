"""dalle_fast: DALL-E (Zero-Shot Text-to-Image Generation) with hand-written sparse kernels."""

__version__ = "0.1.0"

from .ops import backend_info  # noqa: E402

__all__ = ["__version__", "backend_info"]
