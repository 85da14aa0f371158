"""The OpenAI Completions API layer: validation, prompts, echo, logprobs, SSE and error envelopes.

It speaks JSON on one side and engine token ids on the other; it never touches tensors.
"""
