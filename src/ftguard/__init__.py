"""ftguard: keep LLMs safe when they are fine-tuned for customers."""

__version__ = "0.1.0"
