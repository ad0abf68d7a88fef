# GPU image for the training/generation rules (paper config).
#   docker build -f containers/gpu.Dockerfile -t privcode-gpu .
FROM nvcr.io/nvidia/pytorch:25.01-py3
WORKDIR /opt/privcode
COPY pyproject.toml README.md ./
COPY privcode ./privcode
RUN pip install --no-cache-dir -e '.[gpu]'
