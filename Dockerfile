# CNF on the legacy D4RL stack (gym 0.23.1 + d4rl + mujoco-py 2.1.2.14 on MuJoCo 2.1), on a GPU.
#
#   docker build -t cnf .
#   docker run --gpus all -it --rm -v ~/.d4rl:/root/.d4rl -v $PWD/runs:/workspace/cnf/runs cnf \
#       python algorithms/cnf.py --env halfcheetah-medium-v2
#
# ~/.d4rl keeps D4RL's downloaded datasets between runs; runs/ receives the results.
# The host needs the NVIDIA Container Toolkit and a driver for CUDA 13.0 (>= 580).
# The modern path works here too, e.g. `... cnf python algorithms/cnf.py --env halfcheetah-medium-gymv5`.

# CUDA 13.0 runtime on Ubuntu 22.04. torch==2.13.0's PyPI wheels are CUDA 13.0 builds (they depend on
# cuda-toolkit==13.0.3 and nvidia-cudnn-cu13, which pip installs), so the base's CUDA major matches
# them and the NVIDIA runtime refuses hosts whose driver is too old. cuDNN comes with the torch wheel,
# hence `runtime` rather than `cudnn-runtime`.
FROM nvidia/cuda:13.0.2-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.10, Ubuntu 22.04's own: the only version all pins accept. mujoco-py 2.1.2.14 and d4rl
# support 3.7-3.10 (d4rl: Requires-Python <3.11) and torch 2.13.0 needs >= 3.10 (no cp39 wheels), so
# deadsnakes' 3.9 is out. -dev and distutils: mujoco-py compiles a C extension at first import.
# GL/GLEW/OSMesa headers and patchelf: mujoco-py's (OSMesa) extension build; git: the git+ pins.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.10 python3.10-dev python3.10-venv python3-distutils \
        build-essential gcc patchelf git wget ca-certificates unzip software-properties-common \
        libgl1-mesa-dev libgl1-mesa-glx libglew-dev libosmesa6-dev libegl1 \
    && rm -rf /var/lib/apt/lists/*

# MuJoCo 2.1.0 binaries where mujoco-py looks for them: the tarball's top directory is mujoco210/.
RUN mkdir -p /root/.mujoco \
    && wget -q https://github.com/deepmind/mujoco/releases/download/2.1.0/mujoco210-linux-x86_64.tar.gz \
        -O /tmp/mujoco210.tar.gz \
    && tar -xzf /tmp/mujoco210.tar.gz --no-same-owner -C /root/.mujoco \
    && rm /tmp/mujoco210.tar.gz \
    && test -f /root/.mujoco/mujoco210/bin/libmujoco210.so

# mujoco-py insists on mujoco210/bin (and, on GPU hosts, /usr/lib/nvidia) in LD_LIBRARY_PATH.
# Headless rendering: MUJOCO_PY_FORCE_CPU makes mujoco-py always use its OSMesa extension, the one
# compiled below (no GPU at build time), instead of rebuilding an EGL one at run time; MUJOCO_GL and
# PYOPENGL_PLATFORM select OSMesa for Gymnasium's mujoco too, which needs no NVIDIA graphics
# capability (training never renders; pass -e MUJOCO_GL=egl -e NVIDIA_DRIVER_CAPABILITIES=all for EGL).
ENV MUJOCO_PY_MUJOCO_PATH=/root/.mujoco/mujoco210 \
    LD_LIBRARY_PATH=/root/.mujoco/mujoco210/bin:/usr/lib/nvidia:${LD_LIBRARY_PATH} \
    MUJOCO_PY_FORCE_CPU=1 \
    MUJOCO_GL=osmesa \
    PYOPENGL_PLATFORM=osmesa

# A virtualenv keeps pip away from Ubuntu's python3 packages; its python/pip come first on PATH.
RUN python3.10 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --upgrade pip setuptools wheel

# The pinned legacy stack (requirements-docker.txt explains every pin). PyPI lines are installed with
# their dependencies; the git+ lines (d4rl, mjrl) with --no-deps, since d4rl's setup.py would also pull
# dm_control, pybullet and an unpinned mjrl for envs CNF does not use. Copied alone for layer caching.
COPY requirements-docker.txt /tmp/requirements-docker.txt
RUN grep -v "git+" /tmp/requirements-docker.txt > /tmp/requirements-pypi.txt \
    && grep "^[^#]*git+" /tmp/requirements-docker.txt > /tmp/requirements-git.txt \
    && pip install -r /tmp/requirements-pypi.txt \
    && pip install --no-deps -r /tmp/requirements-git.txt

# Build-time check. Importing mujoco_py compiles its Cython extension (cached in site-packages, so
# runs start at once); D4RL must register its envs and gym must build one. No dataset is downloaded.
RUN python -c "import mujoco_py, d4rl, gym; env = gym.make('halfcheetah-medium-v2'); env.reset(); \
    print('d4rl OK', env.observation_space.shape)"
# The modern stack in the same image: torch imports, Gymnasium's MuJoCo env builds.
RUN python -c "import torch, gymnasium; gymnasium.make('HalfCheetah-v5').reset(seed=0); \
    print('torch', torch.__version__, 'gymnasium OK')"

# d4rl warns at every import about its optional suites (flow, carla, kitchen, bullet) being absent;
# silenced only now, so that a failure of the check above still printed the reason.
ENV D4RL_SUPPRESS_IMPORT_ERROR=1 \
    D4RL_DATASET_DIR=/root/.d4rl/datasets

# The project itself (.dockerignore keeps runs/, wandb/, .git and large data out).
WORKDIR /workspace/cnf
COPY . .
