"""The pipeline's steps as plain Python: one module per step, each with a typed config and a CLI.

Steps: preprocess, train, evaluate, export. What two of them share lives in a module of its
own (model, records, storage, imaging, ...); no module imports a step.

Imports sit at the top of each file, with four exceptions, imported inside the functions that
use them: TensorFlow, Keras, JAX and TensorFlow Datasets. Each costs seconds to import (TF
2.7 s of CPU here) and Keras must not be imported before `components.backend` has chosen its
backend (KERAS_BACKEND is read once, at import). Loaded lazily, `--help`, `pipeline.py
compile`, the preprocess parent process (which only routes records: bench/RESULTS.md) and
every CLI's argument errors stay instant. The onnx extra (tf2onnx, onnx, onnxruntime) is
imported where `export --formats onnx` needs it, because it is optional and may be absent.
`commands.py` imports `components.serve` (KServe's model server, 1.4 s) only for `serve`.
tests/test_imports.py holds both rules.
"""
