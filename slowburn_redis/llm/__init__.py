"""The LLM layer: litellm calls priced, admitted by the shared budget, and committed to the ledger.

This is the only part of slowburn-redis that imports litellm (slow to
import). On a host without internet set ``LITELLM_LOCAL_MODEL_COST_MAP=True``
and ``LITELLM_OFFLINE_MODE=true`` before importing it, so litellm uses the
price map it ships instead of fetching one.
"""

from slowburn_redis.llm.client import BudgetedLLM, CallQuote
from slowburn_redis.llm.estimate import CallEstimate, count_input_tokens, estimate_call, output_cap
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage, open_call
from slowburn_redis.llm.mock import mock_reply
from slowburn_redis.llm.options import BUDGET_OPTIONS, CallOptions
from slowburn_redis.llm.pricing import Price, PricePerToken, UnpricedModel, resolve_price
from slowburn_redis.llm.stream import BudgetedStream, SyncBudgetedStream

__all__ = [
    "BUDGET_OPTIONS",
    "BudgetedLLM",
    "BudgetedStream",
    "CallEstimate",
    "CallOptions",
    "CallQuote",
    "Meter",
    "MeteredCall",
    "Price",
    "PricePerToken",
    "SyncBudgetedStream",
    "UnpricedModel",
    "Usage",
    "count_input_tokens",
    "estimate_call",
    "mock_reply",
    "open_call",
    "output_cap",
    "resolve_price",
]
