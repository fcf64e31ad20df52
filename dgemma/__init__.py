"""dgemma: DiffusionGemma-style block-diffusion text generation in PyTorch.

    from dgemma import LLM, SamplingParams
    print(LLM().generate("ROMEO:", SamplingParams(seed=0))[0].text)

`LLM` and `SamplingParams` are imported on first use, so `dgemma --help` (and any tool that only needs a
submodule) does not pay for importing torch.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dgemma' has no attribute {name!r}")
