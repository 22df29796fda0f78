"""Training and evaluation of dinov2clip projectors (DESIGN §5, §6): `python -m training.run`.

Importing this package is cheap: heavy dependencies (matplotlib, webdataset) load inside the
functions that need them, so `training.metrics` works with the core install alone."""
