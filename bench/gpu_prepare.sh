#!/usr/bin/env bash
# Run HERE (the CPU machine, with network to package registries) before a GPU check: packs into
# .gpu/ (git-ignored; carried to the GPU machine by the device tool, limit 64 MiB) what its image
# lacks: wheels for Python 3.12 (deepspeed built from its sdist, POT, datasets, pydantic, ...; this
# machine's transformers, for the versions tested here, and TRL for bench/trl_comparison.py) and
# the model config, tokenizer and CHAMP pairs (bench/gpu_assets.py). Then, through the device tool:
#     run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=580)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu/wheels
rm -rf .gpu
mkdir -p "$WHEELS"
pkg_version() { python -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1"; }
DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -q -w "$WHEELS" "deepspeed==$(pkg_version deepspeed)"
# Binary wheels for the GPU image's Python (3.12), at this machine's versions (the ones tested here);
# only what that image does not already hold, plus transformers to replace its older one.
PINNED=()
for name in POT datasets dill multiprocess hjson pydantic pydantic-core annotated-types typing-inspection \
            regex transformers trl; do
    PINNED+=("${name}==$(pkg_version "$name")")
done
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PINNED[@]}"
python bench/gpu_assets.py pack .gpu/assets
du -sh .gpu
