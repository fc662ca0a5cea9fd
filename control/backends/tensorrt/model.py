"""Python-based Triton backend named ``tensorrt`` for the embedded server on a GPU host (UNTESTED ON A GPU).

In the NGC container Triton's native TensorRT backend takes ``model.plan``; without a container this shim runs
the same engine through ``engine.py`` beside this file (the runner ``build/trt.py`` checks engines with), with
CUDA memory from libcudart via ctypes: no torch. It needs the ``tensorrt`` package (extra ``gpu``) and a CUDA
GPU; without them the model fails to load with a message that says which is missing, and the rest of the
repository is unaffected. ``tools/gpu-check`` is the first run of this file on a GPU.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine as trt_engine  # noqa: E402


class TritonPythonModel:
    """Runs one TensorRT engine (explicit batch, one optimisation profile over the config's batch range)."""

    def initialize(self, args: dict) -> None:
        name = args["model_name"]
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"model '{name}': the tensorrt backend shim needs the 'tensorrt' package (extra 'gpu'): {exc}"
            ) from exc
        if not trt_engine.cuda_gpus():
            raise pb_utils.TritonModelException(f"model '{name}': no CUDA GPU on this host (libcuda sees none)")
        self.config = json.loads(args["model_config"])
        filename = self.config.get("default_model_filename") or "model.plan"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(f"model '{name}': file not found: {path}")
        with open(path, "rb") as f:
            try:
                self.engine = trt_engine.Engine(f.read(), max_batch=int(self.config.get("max_batch_size", 64)))
            except RuntimeError as exc:
                raise pb_utils.TritonModelException(f"model '{name}': {path}: {exc}") from exc
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        # the config's types win (an engine may compute INT64 ids as INT32)
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.config["output"]}
        if set(self.input_names) != set(self.engine.inputs) or not set(self.output_names) <= set(self.engine.outputs):
            raise pb_utils.TritonModelException(
                f"model '{name}': config inputs {sorted(self.input_names)} / outputs {sorted(self.output_names)} "
                f"do not match the engine's {sorted(self.engine.inputs)} / {sorted(self.engine.outputs)}"
            )

    def execute(self, requests: list) -> list:
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests]
        sizes = [f[self.input_names[0]].shape[0] for f in feeds]
        try:
            out = self.engine.run({n: np.concatenate([f[n] for f in feeds]) for n in self.input_names})
        except RuntimeError as exc:
            err = pb_utils.TritonError(f"TensorRT execution failed: {exc}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, out[n][start : start + size].astype(self.output_dtypes[n]))
                       for n in self.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.engine.close()
