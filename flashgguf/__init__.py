"""flashgguf: run GGUF models bigger than DRAM on stock llama.cpp by streaming FFN neurons
from flash ("LLM in a flash", Alizadeh et al. 2023)."""

from .errors import FlashGGUFError

__version__ = "0.1.0"
__all__ = ["FlashGGUFError", "Llama", "__version__"]


def __getattr__(name: str):
    # Importing llama_cpp loads llama.cpp: only do it when the Llama class is asked for.
    if name == "Llama":
        from .llama import Llama

        return Llama
    raise AttributeError(name)
