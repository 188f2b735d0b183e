"""mmalign: align generative and vision-language models with preferences."""

__version__ = "0.1.0"
