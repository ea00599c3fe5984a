#!/usr/bin/env bash
# A venv with lmms-eval, layered over an hf_vlm venv instead of beside it (docs/lmms_eval.md):
#
#     bash docs/lmms_eval/layered_venv.sh .venv .venv-lmms
#
# lmms-eval's declared requirements pull ~150 packages (wandb pinned, openai, yt-dlp, ...) and would move the
# project venv's versions. This venv installs lmms-eval without them, plus the few modules this task needs
# (requirements-layered.txt), and sees the base venv's torch, transformers, datasets and hf_vlm through a .pth file.
# Its own site-packages comes first on sys.path, so its filelock 3 shadows the base's filelock 4.
set -euo pipefail
base=$1
new=$2
"$base/bin/python" -m venv "$new"
base_site=$("$base/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
new_site=$("$new/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
# site.addsitedir, not a bare path line, so the base's own .pth files (hf_vlm's editable install) apply too.
echo "import site; site.addsitedir('$base_site')" > "$new_site/base_venv.pth"
"$new/bin/pip" install -q --no-deps -r "$(dirname "$0")/requirements-layered.txt"
