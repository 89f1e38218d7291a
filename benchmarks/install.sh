#!/usr/bin/env bash
# Comparison tools for the benchmarks. grad-cam goes in without its dependencies: its
# torchvision requirement would replace the CPU torch wheel with a multi-GB CUDA build.
set -euo pipefail
pip install captum opencv-python-headless scikit-learn scipy tqdm
pip install --no-deps grad-cam ttach
