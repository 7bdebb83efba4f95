"""Model code: the tiny default model, loading any Hugging Face checkpoint, value head, serving."""
