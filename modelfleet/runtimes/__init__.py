"""Inference runtimes: the servers that run INSIDE the model containers, and their images.

- ``modelfleet.runtimes.torch_server``: TorchServe-compatible server for ``.mar`` archives
  (``GET /ping``, ``POST /predictions/<model>[/<version>]``).
- ``modelfleet.runtimes.transformers_server``: HuggingFace models (embeddings, classification,
  text generation, diffusers) with OpenAI/TEI/TGI-compatible endpoints (``GET /health``).
- ``modelfleet.runtimes.images``: builds ``modelfleet/runtime-torch`` and
  ``modelfleet/runtime-transformers`` on Docker hosts (no registry needed).

This package is copied alone into the images: it must not import the rest of ``modelfleet``
(nor pydantic, docker, rich, ... at import time of the servers).
"""

RUNTIME_VERSION = "0.1.0"
