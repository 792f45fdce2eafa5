"""Prices of LLM calls: litellm's price map, a registered price, or an explicit price per token.

A model without a price is refused before any call (`UnpricedModel`): a call
the budget cannot price would be a silent zero-cost call. A model priced at
zero in litellm's map (a local model, say) counts as unpriced too; pass
``price_per_token=0`` to accept free calls on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import litellm

from slowburn_redis.errors import InvalidInput

PricePerToken = float | tuple[float, float]
"""One price for every token, or ``(input, output)`` dollars per token."""


class UnpricedModel(InvalidInput):
    """The model has no price: register one (``litellm.register_model``) or pass ``price_per_token=``."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} has no price in litellm's price map: register one with litellm.register_model "
            "or pass price_per_token= (refusing a call whose cost cannot be counted)"
        )
        self.model = model


@dataclass(frozen=True)
class Price:
    """How one model is priced: from litellm (`explicit` False) or per token as given."""

    model: str
    input_per_token: float
    output_per_token: float
    explicit: bool

    def cost(self, input_tokens: int, output_tokens: int, usage: Any = None) -> float:
        """Dollars for these tokens; litellm's own arithmetic unless the price was given explicitly.

        `usage` (a litellm Usage) lets litellm price cached and reasoning tokens as the provider does.
        """
        if self.explicit:
            return input_tokens * self.input_per_token + output_tokens * self.output_per_token
        prompt, completion = litellm.cost_per_token(
            model=self.model, prompt_tokens=input_tokens, completion_tokens=output_tokens, usage_object=usage
        )
        return float(prompt) + float(completion)

    def response_cost(self, response: Any, input_tokens: int, output_tokens: int) -> float:
        """The cost of a completed response: the cost litellm computed for it, else litellm.completion_cost."""
        if self.explicit:
            return self.cost(input_tokens, output_tokens)
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost")
        if cost is None:
            try:
                cost = litellm.completion_cost(completion_response=response)
            except Exception:  # litellm could not price this response object: price its tokens
                cost = self.cost(input_tokens, output_tokens, getattr(response, "usage", None))
        return float(cost)


def resolve_price(model: str, price_per_token: PricePerToken | None = None) -> Price:
    """The price of `model`, or UnpricedModel; a bad `price_per_token` raises InvalidInput."""
    if not isinstance(model, str) or not model:
        raise InvalidInput(f"model must be a non-empty string, not {model!r}")
    if price_per_token is not None:
        pair = price_per_token if isinstance(price_per_token, tuple) else (price_per_token, price_per_token)
        if len(pair) != 2 or not all(_price_number(p) for p in pair):
            raise InvalidInput(
                f"price_per_token must be a non-negative number or an (input, output) pair, not {price_per_token!r}"
            )
        return Price(model, float(pair[0]), float(pair[1]), explicit=True)
    try:
        info = litellm.get_model_info(model)
    except Exception:
        raise UnpricedModel(model) from None
    input_cost = info.get("input_cost_per_token") or 0.0
    output_cost = info.get("output_cost_per_token") or 0.0
    if not input_cost and not output_cost:
        raise UnpricedModel(model)
    return Price(model, float(input_cost), float(output_cost), explicit=False)


def _price_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
