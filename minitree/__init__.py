"""minitree: lossless tree speculative decoding in plain PyTorch."""

from . import cli, tp
from .chat import encode
from .config import ModelArgs, from_hf_config
from .engine import Engine
from .errors import ConfigError, EngineError, FetchError, LoadError, MinitreeError, SamplingError, TreeError
from .forms import quantize, restrict_vocab
from .loading import load
from .model import Transformer
from .runner import Runner
from .sampling import Sampling
from .stats import Result, Stats, Step
from .tree import DynamicTree, NgramTree, StepTree, Tree, TreeSpec, parse_tree

__all__ = ["cli", "tp", "load", "Engine", "Runner", "Tree", "DynamicTree", "NgramTree", "TreeSpec", "StepTree", "parse_tree",
           "Sampling", "Transformer", "ModelArgs", "from_hf_config", "Result", "Stats", "Step", "encode", "quantize",
           "restrict_vocab", "MinitreeError", "ConfigError", "EngineError", "FetchError", "LoadError", "SamplingError",
           "TreeError"]
