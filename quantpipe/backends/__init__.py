"""Format glue shared by a method and a runtime: llama.cpp's bindings, converter and GGUF checks (llamacpp_tools.py),
an ONNX decoder graph's inputs, outputs and tensor bytes (onnx.py). Below methods and runtimes, so neither
imports the other."""
