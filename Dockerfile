# Microsite Kit: a GPU-ready image. Build with `docker build -t microsite-kit .`, run with
#   docker run --gpus all -p 7860:7860 -v kit-data:/data -e KIT_PRESET=sdxl-turbo microsite-kit
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    KIT_DATA_DIR=/data \
    HF_HOME=/data/hf-cache \
    KIT_HOST=0.0.0.0 \
    KIT_PORT=7860

RUN useradd --create-home --uid 1000 kit \
    && mkdir -p /data \
    && chown kit:kit /data

WORKDIR /app
COPY --chown=kit:kit requirements.txt ./
# Set TORCH_INDEX to a PyTorch wheel index to pick a CUDA version; PyPI's default build
# already includes CUDA on x86_64 Linux.
ARG TORCH_INDEX=""
RUN if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" "torch>=2.4,<3"; fi \
    && pip install -r requirements.txt

COPY --chown=kit:kit app.py ./
COPY --chown=kit:kit kit ./kit
COPY --chown=kit:kit presets ./presets
COPY --chown=kit:kit models ./models

USER kit
VOLUME ["/data"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request, os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"KIT_PORT\", \"7860\")}/', timeout=4)"
CMD ["python", "app.py"]
