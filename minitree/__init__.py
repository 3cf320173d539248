"""minitree: lossless tree speculative decoding in plain PyTorch."""

from . import cli, tp
from .chat import encode
from .config import ConfigError, ModelArgs, from_hf_config
from .engine import Engine, EngineError, Result, Stats
from .loading import LoadError, load
from .model import Transformer
from .quant import cheapen, quantize, quantize_int8, restrict_vocab
from .sampling import Sampling, SamplingError
from .tree import DynamicTree, StepTree, Tree, TreeError, TreeSpec, parse_tree

__all__ = ["cli", "tp", "load", "Engine", "Tree", "DynamicTree", "TreeSpec", "StepTree", "parse_tree", "Sampling", "Transformer", "ModelArgs", "from_hf_config", "Result", "Stats",
           "encode", "cheapen", "quantize", "quantize_int8", "restrict_vocab",
           "ConfigError", "EngineError", "LoadError", "SamplingError", "TreeError"]
