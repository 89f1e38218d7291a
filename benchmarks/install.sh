#!/usr/bin/env bash
# Comparison tools for the benchmarks (the versions the test suite checks against). grad-cam goes
# in without its dependencies: its torchvision requirement would replace the CPU torch wheel with
# a multi-GB CUDA build; the packages it imports are installed here (and are in the dev extra).
set -euo pipefail
pip install "captum==0.9.0" opencv-python-headless scikit-learn scipy tqdm "ttach==0.0.3"
pip install --no-deps "grad-cam==1.5.7"
