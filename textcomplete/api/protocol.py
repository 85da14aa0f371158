"""The request side of the contract: a JSON body -> a validated `CompletionRequest`, or a 400 naming the field.

Ranges and defaults follow the API reference (conformance R10-R22); unknown fields are ignored (R20).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from textcomplete.api.errors import APIError, invalid

DEFAULT_PROMPT = "<|endoftext|>"
MAX_STOP_SEQUENCES = 4
_INT64 = (-(1 << 63), (1 << 63) - 1)

Prompt = str | list[int]


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[Prompt]                  # each a string or a list of token ids, in request order
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    best_of: int = 1
    echo: bool = False
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    include_obfuscation: bool = False
    suffix: str | None = None
    user: str | None = None


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _wrong_type(name: str, expected: str, value: object) -> APIError:
    return invalid(f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.",
                   param=name, code="invalid_type")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    if value < low:
        raise invalid(f"{value} is less than the minimum of {low:g} - '{name}'", param=name, code="invalid_value")
    if value > high:
        raise invalid(f"{value} is greater than the maximum of {high:g} - '{name}'", param=name,
                      code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int | None = None,
             high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if low is not None and value < low:
        raise invalid(f"{value} is less than the minimum of {low} - '{name}'", param=name, code="invalid_value")
    if high is not None and value > high:
        raise invalid(f"{value} is greater than the maximum of {high} - '{name}'", param=name,
                      code="invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)
    return value


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_prompts(value: object) -> list[Prompt]:
    """The four prompt forms (R28), and null meaning the end-of-text document boundary (R21)."""
    if value is None:
        return [DEFAULT_PROMPT]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if _is_token_list(value):
            return [list(value)]
        if all(_is_token_list(p) and p for p in value):
            return [list(p) for p in value]
    if value == []:
        raise invalid("Invalid 'prompt': an empty array is not a prompt.", param="prompt", code="invalid_value")
    raise invalid("Invalid 'prompt': expected a string, an array of strings, an array of token ids, "
                  "or an array of non-empty arrays of token ids.", param="prompt", code="invalid_type")


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"Invalid 'stop': array too long. Expected an array with maximum length "
                      f"{MAX_STOP_SEQUENCES}, but got an array with length {len(stops)} instead.",
                      param="stop", code="array_above_max_length")
    if any(s == "" for s in stops):
        raise invalid("Invalid 'stop': stop sequences must not be empty.", param="stop", code="invalid_value")
    return list(dict.fromkeys(stops))


def _logit_bias(value: object) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong_type("logit_bias", "an object", value)
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"Invalid key in 'logit_bias': {key!r} is not a token id.", param="logit_bias",
                          code="invalid_value") from None
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise _wrong_type("logit_bias", "numbers as values", amount)
        if not -100 <= amount <= 100:
            raise invalid(f"Invalid value in 'logit_bias': {amount} is outside -100..100 (token {key}).",
                          param="logit_bias", code="invalid_value")
        bias[token] = float(amount)
    return bias


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                      param="stream_options", code="invalid_value")
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    return _boolean(options, "include_usage"), _boolean(options, "include_obfuscation")


def parse_completion_request(body: object) -> CompletionRequest:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    n = _integer(body, "n", 1, 1, 128)
    best_of = _integer(body, "best_of", n, 0, 20)
    if best_of < n:
        raise invalid(f"best_of must be greater than or equal to n, got n={n} and best_of={best_of}.",
                      param="best_of", code="invalid_value")
    stream = _boolean(body, "stream")
    if stream and best_of > n:
        raise invalid("Results cannot be streamed when best_of is greater than n.", param="best_of",
                      code="invalid_value")
    include_usage, include_obfuscation = _stream_options(body, stream)
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _wrong_type("suffix", "a string", suffix)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _wrong_type("user", "a string", user)
    return CompletionRequest(
        model=model, prompts=parse_prompts(body.get("prompt")),
        # Absent means 16 (R33); an explicit null means "until a stop or the context is full".
        max_tokens=_integer(body, "max_tokens", None, 0) if "max_tokens" in body else 16,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        n=n, best_of=best_of, echo=_boolean(body, "echo"), logprobs=_integer(body, "logprobs", None, 0, 5),
        stop=_stop(body.get("stop")), presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body.get("logit_bias")), seed=_integer(body, "seed", None, *_INT64),
        stream=stream, include_usage=include_usage, include_obfuscation=include_obfuscation,
        suffix=suffix or None, user=user)
