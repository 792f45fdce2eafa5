"""``python -m slowburn_redis.cli``: the same as the ``slowburn-redis`` command."""

from slowburn_redis.cli import main

main()
