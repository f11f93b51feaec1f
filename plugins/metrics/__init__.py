"""Metric plugins: Fréchet distances on learned features (``fid_inception``, ``fd_photos``)."""
