"""infera: a readable LLM inference engine for CPUs and GPUs."""
from infera.llm import LLM
from infera.outputs import CompletionOutput, RequestOutput
from infera.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
