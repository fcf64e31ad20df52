"""dgemma: DiffusionGemma-style block-diffusion text generation in PyTorch.

    from dgemma import LLM, SamplingParams
    print(LLM().generate("ROMEO:", SamplingParams(seed=0))[0].text)
"""

__version__ = "0.1.0"

from .llm import LLM  # noqa: E402
from .sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]
