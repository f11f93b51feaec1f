"""Exported model formats (entry-point group `ulframe.formats`): `ulframe export` and
`ulframe.load` reach them through `ulframe/formats.py`."""
