# One image for every Conveyor part; compose.yaml picks the part with `command`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY services ./services
COPY conveyor ./conveyor
COPY tools ./tools
RUN pip install --no-cache-dir . \
    && groupadd --gid 10001 conveyor \
    && useradd --uid 10001 --gid conveyor --create-home conveyor

USER 10001:10001
WORKDIR /home/conveyor
CMD ["conveyor", "--help"]
