# The local DynamoDB (and S3) endpoint: moto in server mode, the same one `python -m infra start`
# runs on a developer machine. Build: docker build -f docker/dynamodb.Dockerfile -t reco-dynamodb docker
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG MOTO_VERSION=5.2.5
ARG APP_UID=10001
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install "moto[server]==${MOTO_VERSION}" \
    && useradd --create-home --uid "${APP_UID}" --user-group moto
USER moto
EXPOSE 5000
HEALTHCHECK --interval=5s --timeout=5s --retries=12 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/moto-api/data.json', timeout=4)"]
ENTRYPOINT ["moto_server"]
CMD ["-H", "0.0.0.0", "-p", "5000"]
