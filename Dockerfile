# The slowburn-redis package with its examples: the image of the worker and watch services in docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY slowburn_redis ./slowburn_redis
COPY lua ./lua
COPY examples ./examples
RUN pip install --no-cache-dir ".[cli]"
ENV SLOWBURN_REDIS_URL=redis://redis:6379/0 \
    PYTHONUNBUFFERED=1
CMD ["slowburn-redis", "--help"]
