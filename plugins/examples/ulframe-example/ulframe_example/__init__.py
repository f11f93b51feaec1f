"""Example third-party ulframe plugins (see README.md).

- `weightings.edm`: EDM's loss weighting (Karras et al. 2022) written as a weighting of log-SNR.
- `hooks.example_counter`: counts logged training steps and writes a JSON file at run end.
- `datasets.stripes`: synthetic stripes, two classes, no files.
- `encoders.patch`: a patch encoder for images and clips.

No module imports gin, and nothing registers at import time: the entry points in
pyproject.toml are the only registration.
"""

__version__ = "0.1.0"
