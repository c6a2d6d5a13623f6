"""GPU worker: the inference engine (continuous batching over a paged KV cache) and its process."""

from gpu_worker.chains import ChainCompletion, ChainRequest, ChainStep, OutputRef
from gpu_worker.config import EngineConfig
from gpu_worker.engine import Engine
from gpu_worker.grammar import Grammar
from gpu_worker.request import Completion, Request, TokenDelta
from gpu_worker.sampling_params import SamplingParams

__all__ = ["ChainCompletion", "ChainRequest", "ChainStep", "Completion", "Engine", "EngineConfig", "Grammar",
           "OutputRef", "Request", "SamplingParams", "TokenDelta"]
