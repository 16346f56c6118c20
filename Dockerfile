# opsbay-mqtt image: one image for coordinator, worker and the CLI.
#   docker build -t opsbay-mqtt .
#   docker run --rm -e OPSBAY_BROKER=mqtt://broker:1883 -e OPSBAY_SECRET=... opsbay-mqtt submit ...
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# .dockerignore keeps .git, virtualenvs, caches, local data and .env out.
COPY . .
# The postgresql extra: a coordinator may keep its record in PostgreSQL (docker-compose.ha.yml).
RUN pip install '.[postgresql]' \
 && useradd --system --create-home --uid 10001 opsbay \
 && mkdir -p /data /state \
 && chown opsbay:opsbay /data /state

# Named volumes mounted on /data and /state start out owned by opsbay.
USER opsbay
WORKDIR /home/opsbay
ENTRYPOINT ["opsbay"]
CMD ["--help"]
