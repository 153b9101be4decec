"""Models segpipe runs: the built-in U-Net and its checkpoints, MONAI bundles, nnU-Net folders, TorchScript
and ONNX files with their cards, one loader for all of them (:mod:`segpipe.models.load`), and the export of a
checkpoint to TorchScript or ONNX. The classical methods live in :mod:`segpipe.methods`."""
