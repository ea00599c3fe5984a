#!/usr/bin/env bash
# A venv with lmms-eval, layered over an hf_vlm venv instead of beside it (docs/lmms_eval.md):
#
#     bash docs/lmms_eval/layered_venv.sh .venv .venv-lmms
#
# lmms-eval's declared requirements pull ~150 packages (wandb pinned, openai, yt-dlp, ...) and would move the
# project venv's versions. This venv holds only lmms-eval and the few packages this task needs
# (requirements-layered.txt, installed without their dependencies) and sees the base venv's torch, transformers,
# datasets and hf_vlm through a .pth file. Its own site-packages comes first on sys.path, so its filelock 3 shadows
# the base's filelock 4. Made again from scratch when it exists.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 BASE_VENV NEW_VENV" >&2
    exit 2
fi
base=$1
new=$2
if [ "$(realpath -m "$base")" = "$(realpath -m "$new")" ]; then
    echo "error: NEW_VENV must not be BASE_VENV (this would install lmms-eval and filelock 3 into it)" >&2
    exit 2
fi
# The base's interpreter, so both venvs run the same Python; no pip of its own, so that nothing but the listed
# packages shadows the base's (a venv's bundled pip and setuptools would).
"$base/bin/python" -m venv --clear --without-pip "$new"
# site.addsitedir, not a bare path line, so the base's own .pth files (hf_vlm's editable install) apply too; repr
# quotes any path.
"$base/bin/python" -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_path("purelib"))' \
    > "$("$new/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/base_venv.pth"
"$base/bin/python" -m pip --python "$new/bin/python" install -q --no-deps -r "$(dirname "$0")/requirements-layered.txt"
