#!/usr/bin/env bash
# Start JupyterLab for the workshop: 127.0.0.1 only, token auth on, serving notebooks/,
# with the project's settings, workspace and kernel. `make lab` runs this after the install.
# Extra arguments go to `jupyter lab` (e.g. --no-browser --port 8890).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
BIN="$VENV/bin"
STATE="$ROOT/.lab-state"

# The install check: prints what is missing and how to fix it; problems don't stop the lab.
"$BIN/sftkit" doctor || echo "(sftkit doctor found problems: see the fix lines above)"

# The kernel the notebooks name in their metadata, so no "Select Kernel" dialog opens.
"$BIN/python" -m ipykernel install --sys-prefix --name sftkit --display-name "sftkit (Python 3)" >/dev/null

# Workshop settings: no news pop-up, no update checks, no extension manager.
SETTINGS="$VENV/share/jupyter/lab/settings"
mkdir -p "$SETTINGS" "$STATE/user-settings" "$STATE/workspaces"
cp "$ROOT/lab/overrides.json" "$SETTINGS/overrides.json"

# The workspace that opens the first notebook; a layout the user changed is kept.
if [ -z "$(ls -A "$STATE/workspaces")" ]; then
    "$BIN/jupyter" lab workspaces import --LabWorkspaceImportApp.workspaces_dir="$STATE/workspaces" \
        "$ROOT/lab/workspace.json" >/dev/null
fi

OPEN_BROWSER=True
if [ -n "${CI:-}" ] || { [ -z "${DISPLAY:-}" ] && [ "$(uname)" = Linux ]; }; then OPEN_BROWSER=False; fi

EXTRA=()
# Containers and CI run as root; JupyterLab refuses that without the flag.
if [ "$(id -u)" = 0 ]; then EXTRA+=(--allow-root); fi

cd "$ROOT/notebooks"
# SFTKIT_FRONTEND=notebook (`make notebook`): the classic-looking Notebook 7 interface instead of JupyterLab.
if [ "${SFTKIT_FRONTEND:-lab}" = notebook ]; then
    exec "$BIN/jupyter" notebook \
        --ServerApp.ip=127.0.0.1 \
        --ServerApp.root_dir="$ROOT/notebooks" \
        --ServerApp.open_browser="$OPEN_BROWSER" \
        --JupyterNotebookApp.user_settings_dir="$STATE/user-settings" \
        "${EXTRA[@]}" "$@"
fi
exec "$BIN/jupyter" lab \
    --ServerApp.ip=127.0.0.1 \
    --ServerApp.root_dir="$ROOT/notebooks" \
    --ServerApp.open_browser="$OPEN_BROWSER" \
    --LabApp.user_settings_dir="$STATE/user-settings" \
    --LabApp.workspaces_dir="$STATE/workspaces" \
    "${EXTRA[@]}" "$@"
