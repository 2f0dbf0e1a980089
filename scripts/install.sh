#!/usr/bin/env bash
# psalm: one-command install. Creates a virtualenv (default ./.venv) with the pinned stack from
# scripts/constraints.txt, a patched detectron2 (unless a working one is already there), the
# deformable-attention kernel, and psalm itself in editable mode.
#
#   bash scripts/install.sh                 # fresh machine, CPU or GPU
#   PSALM_VENV=/path/to/env bash scripts/install.sh   # another (existing) environment
#   PSALM_KEEP_TORCH=1 ...                  # keep the torch/torchvision already in that environment
#   PSALM_NO_KERNEL=1 ...                   # skip building the compiled MSDeformAttn kernel
#
# Idempotent: a second run checks a stamp and the imports, and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${PSALM_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
CONSTRAINTS=$ROOT/scripts/constraints.txt
log() { echo "[install] $*"; }

if [ ! -x "$PY" ]; then
  log "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi

# Everything that decides what gets installed goes into the stamp.
STAMP=$VENV/.psalm-install-stamp
want=$(cat "$CONSTRAINTS" scripts/requirements.txt scripts/install.sh scripts/patch_detectron2.py setup.py \
       <(echo "${PSALM_KEEP_TORCH:-0}${PSALM_NO_KERNEL:-0}") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && \
   "$PY" -c "import psalm, detectron2, torch, transformers, timm, gradio, selenium" 2>/dev/null; then
  log "already installed and up to date ($VENV); nothing to do"
  exit 0
fi

# A constraints file without torch pins when the user keeps their own torch.
CFILE=$CONSTRAINTS
if [ "${PSALM_KEEP_TORCH:-0}" = 1 ]; then
  CFILE=$VENV/.psalm-constraints-keep-torch.txt
  grep -vE '^(torch|torchvision)==' "$CONSTRAINTS" > "$CFILE"
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q -c "$CFILE")

log "upgrading pip/setuptools/wheel"
"${PIP[@]}" pip setuptools wheel
if [ "${PSALM_KEEP_TORCH:-0}" = 1 ]; then
  "$PY" -c "import torch, torchvision" || { echo "PSALM_KEEP_TORCH=1 but torch/torchvision do not import in $VENV" >&2; exit 1; }
else
  log "installing torch + torchvision (pinned)"
  "${PIP[@]}" torch torchvision
fi

log "installing the Python dependencies (pinned)"
"${PIP[@]}" -r scripts/requirements.txt

if "$PY" -c "import detectron2, detectron2.config, detectron2.modeling" 2>/dev/null; then
  log "a working detectron2 is already installed; leaving it alone"
else
  log "building detectron2 from the pb1-detectron2==0.6 sdist with compatibility patches"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
      --no-build-isolation -c "$CFILE" pb1-detectron2 -d "$TMP"
  tar xzf "$TMP"/pb1-detectron2-*.tar.gz -C "$TMP"
  "$PY" scripts/patch_detectron2.py "$TMP"/pb1-detectron2-0.6
  # detectron2's own requirements (hydra, omegaconf, ...) are resolved here under the constraints.
  "${PIP[@]}" --no-build-isolation "$TMP"/pb1-detectron2-0.6
fi

if [ "${PSALM_NO_KERNEL:-0}" != 1 ]; then
  if "$PY" -c "import torch_ms_deform_attn" 2>/dev/null; then
    log "deformable-attention kernel already installed"
  else
    log "building the multi-scale deformable attention kernel (torch-ms-deform-attn, ~90 s)"
    "${PIP[@]}" --no-build-isolation --no-deps torch-ms-deform-attn
  fi
fi

# Installed last and without dependencies: panopticapi-lite's metadata pins numpy<2 and scikit-image,
# which its code does not use (pip may print a harmless "dependency conflicts" note about it).
log "installing the metric references (panopticapi-lite, esdft-segmetric) without their stale pins"
"${PIP[@]}" --no-deps panopticapi-lite esdft-segmetric

log "installing psalm (editable)"
"${PIP[@]}" --no-build-isolation --no-deps -e .

"$PY" -c "import psalm, detectron2; from psalm.config import add_psalm_config"
echo "$want" > "$STAMP"
log "done: $VENV ($(du -sh "$VENV" | cut -f1)). Activate with: source $VENV/bin/activate"
