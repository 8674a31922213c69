"""Inference runtimes: the servers that run INSIDE the model containers.

- ``modelfleet.runtimes.torch_server``: TorchServe-compatible server for ``.mar`` archives
  (``GET /ping``, ``POST /predictions/<model>[/<version>]``).
- ``modelfleet.runtimes.transformers_server``: HuggingFace models (embeddings, classification,
  text generation, diffusers) with OpenAI/TEI/TGI-compatible endpoints (``GET /health``).
- ``modelfleet.runtimes.contract``: the environment the daemon gives a model container
  (``RuntimeEnvironment``), read by the servers and written by the daemon.

This package is copied alone into the images (``modelfleet runtimes build`` makes them; its files
are in the images' content hash): it must not import the rest of ``modelfleet`` (nor pydantic,
docker, rich, ... at import time of the servers), and holds nothing but what runs in a container.
"""

RUNTIME_VERSION = "0.1.0"
