"""lite: quantize Hugging Face causal LMs (SmoothQuant W8A8) into checkpoints serving engines load."""

__version__ = "0.1.0"
