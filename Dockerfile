# gpu-broker as a container, for compose.yaml. It needs the GPUs (NVML) and the host's
# network; see the README's "In Docker".
FROM python:3.11-slim
COPY pyproject.toml README.md LICENSE /src/
COPY broker /src/broker
RUN pip install --no-cache-dir /src && rm -rf /src
RUN useradd --system --home-dir /var/lib/gpu-broker --create-home gpu-broker
USER gpu-broker
ENTRYPOINT []
CMD ["gpu-broker", "run", "-c", "/etc/gpu-broker/config.toml"]
