"""mmserver: a multi-model inference server speaking the KServe V2 / Open Inference Protocol."""

__version__ = "0.1.0"
