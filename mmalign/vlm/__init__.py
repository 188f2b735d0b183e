"""Vision-language model helpers: tiny models for tests and the toy world (`tiny`)."""
