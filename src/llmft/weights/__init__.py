"""Model weights in and out.

`load_pretrained` (`pretrained.py`) turns a model spec into a ready model: a registry name
(weights from the Hugging Face hub, else an offline GGUF package), a Hugging Face folder or a
`.gguf` file. Underneath: `huggingface.py` (config.json + safetensors, both ways), `gguf.py`
(llama.cpp's files), `hub.py` (downloads that fail fast) and `checks.py`.
"""

from llmft.weights.hub import download_hf
from llmft.weights.huggingface import export_hf, load_hf_folder
from llmft.weights.pretrained import Pretrained, load_pretrained

__all__ = ["Pretrained", "download_hf", "export_hf", "load_hf_folder", "load_pretrained"]
