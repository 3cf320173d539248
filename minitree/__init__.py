"""minitree: lossless tree speculative decoding in plain PyTorch."""

from .config import ConfigError, ModelArgs, from_hf_config
from .engine import Engine, EngineError, Result, Stats
from .loading import LoadError, load
from .model import Transformer
from .quant import quantize_int8, restrict_vocab
from .sampling import Sampling, SamplingError
from .tree import Tree, TreeError

__all__ = ["load", "Engine", "Tree", "Sampling", "Transformer", "ModelArgs", "from_hf_config", "Result", "Stats",
           "quantize_int8", "restrict_vocab",
           "ConfigError", "EngineError", "LoadError", "SamplingError", "TreeError"]
