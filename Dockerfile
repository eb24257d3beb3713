# One image for both sides of the range (target service and attacker); compose picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY mlcore mlcore
COPY target_service target_service
COPY defenses defenses
COPY attacker attacker
COPY scripts scripts
RUN pip install .
EXPOSE 8000
CMD ["target-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
