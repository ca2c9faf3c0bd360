# Seamline: tiled Mask R-CNN segmentation on Dask.
# One image serves as Dask scheduler, CPU/GPU worker and `seamline run` client
# (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Explicit COPY lines (no .dockerignore): only what `pip install .` needs.
COPY pyproject.toml README.md ./
COPY models/ models/
COPY pipeline/ pipeline/
COPY workflows/ workflows/

RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 seamline \
    && mkdir -p /data /out \
    && chown seamline:seamline /app /out

USER seamline

CMD ["seamline", "--help"]
