"""infera: a readable LLM inference engine for CPUs and GPUs."""
import os

# PyTorch's OpenMP workers spin about 300k iterations before sleeping.  Measured on 2 cores: a
# short spin (10k) decodes ~1.3x faster on an idle machine and ~1.6x faster next to other busy
# processes, where long spins steal the cores the workers wait for.  Read when libgomp loads, so
# this only takes effect if infera is imported before torch; the environment variable wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from infera.llm import LLM
from infera.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from infera.pooling_params import PoolingParams
from infera.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "PoolingParams", "RequestOutput", "CompletionOutput", "EmbeddingRequestOutput"]
__version__ = "0.1.0"
