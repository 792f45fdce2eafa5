"""Throwaway redis-server processes for tests (see slowburn_redis.redis_server)."""

from slowburn_redis.redis_server import RedisServer, free_port, redis_server_available

__all__ = ["RedisServer", "free_port", "redis_server_available"]
