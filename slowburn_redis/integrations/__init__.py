"""Integrations with agent frameworks; each is an optional extra.

- ``slowburn_redis.integrations.langchain``: a LangChain callback handler
  (``pip install 'slowburn-redis[langchain]'``).

Nothing is imported here, so ``import slowburn_redis`` stays light.
"""
