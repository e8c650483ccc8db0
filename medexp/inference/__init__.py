"""One road from a model to predictions, shared by the commands and reports.

- :mod:`~medexp.inference.loop`: running a model over batches of a split or of files (extra
  inputs, test-time augmentation and Monte Carlo dropout, device and precision, batch limits);
- :mod:`~medexp.inference.inputs`: the files ``input=`` and ``mask=`` name (files, folders,
  globs, CSVs) and where masks go;
- :mod:`~medexp.inference.writers`: what ``medexp predict`` writes for each kind of prediction
  a task declares (``prediction_writer``);
- :mod:`~medexp.inference.artifacts`: exported models (ONNX, ``torch.export`` programs) and their
  sidecar, shared by ``medexp export`` and ``medexp compress``;
- :mod:`~medexp.inference.bundle`: a checkpoint as a MONAI bundle (``medexp export format=bundle``).

Below the commands and reports, above tasks and data: nothing here imports a command.
"""
