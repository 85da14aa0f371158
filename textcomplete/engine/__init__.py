"""The inference engine: requests in token ids, outputs in token ids and log-probabilities.

It knows nothing of HTTP or JSON; the API layer builds on `LLMEngine` and `AsyncEngine`.
"""

from textcomplete.engine.outputs import RequestOutput, TokenLogprob
from textcomplete.engine.sampling_params import SamplingParams

__all__ = ["RequestOutput", "SamplingParams", "TokenLogprob"]
