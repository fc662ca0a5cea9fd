"""Python-based Triton backend named ``tensorrt`` for the embedded server on a GPU host.

In the NGC container Triton's native TensorRT backend takes ``model.plan``; without a container this
shim runs the same engine with the ``tensorrt`` Python runtime and torch CUDA buffers. It needs the
``tensorrt`` package (extra ``gpu``) and a CUDA GPU; without them the model fails to load with a
message that says so, and the rest of the repository is unaffected.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Runs one TensorRT engine (explicit batch, one optimisation profile)."""

    def initialize(self, args: dict) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"model '{args['model_name']}': the tensorrt shim needs the 'tensorrt' package and torch: {exc}"
            ) from exc
        if not torch.cuda.is_available():
            raise pb_utils.TritonModelException(f"model '{args['model_name']}': no CUDA GPU on this host")
        self.torch = torch
        self.config = json.loads(args["model_config"])
        filename = self.config.get("default_model_filename") or "model.plan"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        logger = trt.Logger(trt.Logger.WARNING)
        with open(path, "rb") as f:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise pb_utils.TritonModelException(f"could not deserialize TensorRT engine {path}")
        self.context = self.engine.create_execution_context()
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        self.trt = trt

    def execute(self, requests: list) -> list:
        torch = self.torch
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests]
        sizes = [f[self.input_names[0]].shape[0] for f in feeds]
        stream = torch.cuda.current_stream()
        tensors = {}
        for n in self.input_names:
            host = np.concatenate([f[n] for f in feeds])
            dev = torch.from_numpy(host).cuda()
            self.context.set_input_shape(n, tuple(dev.shape))
            self.context.set_tensor_address(n, dev.data_ptr())
            tensors[n] = dev
        outputs = {}
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = torch.from_numpy(np.zeros(1, dtype=self.trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(n, out.data_ptr())
            outputs[n] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            err = pb_utils.TritonError("TensorRT execution failed")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        stream.synchronize()
        host_out = {n: o.cpu().numpy() for n, o in outputs.items()}
        responses, start = [], 0
        for size in sizes:
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, host_out[n][start : start + size]) for n in self.output_names]
                )
            )
            start += size
        return responses
