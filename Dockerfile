# The devstream hub in a container.
#
#   docker build -t devstream-hub .
#   docker run -d --name devstream-hub -p 8080:8080 -v devstream-data:/data devstream-hub \
#       --public-url https://hub.example.com
#   docker exec devstream-hub devstream connection-string
#
# Arguments after the image name go to `devstream hub` (CMD's default, --public-url
# http://localhost:8080, suits a hub reached through the published port on this machine).
# The registry (every key) lives in the /data volume; a bind mount must be writable by
# uid 10001.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install . && rm -rf /build

RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home devstream \
    && install -d -m 700 -o devstream -g devstream /data
ENV DEVSTREAM_DATA=/data
VOLUME ["/data"]
WORKDIR /data
USER devstream

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["devstream", "hub", "--listen", "0.0.0.0:8080"]
CMD ["--public-url", "http://localhost:8080"]
