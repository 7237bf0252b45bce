# One image for the portal, the worker and the migrations (docker-compose.yml picks the command).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The CUDA build of torch (the default wheel on PyPI for Linux x86_64) serves GPU workers;
# it also runs on CPU.
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY portal portal
COPY worker worker
COPY trainer trainer
COPY admin admin
COPY migrations migrations
RUN pip install . && useradd --create-home --uid 1000 triage && mkdir -p /data && chown triage /data
USER triage
ENV TRIAGE_DATA_DIR=/data
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--timeout", "300", "portal:create_app()"]
