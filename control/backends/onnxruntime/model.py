"""Python-based Triton backend named ``onnxruntime`` for the embedded (CPU, no container) server.

Triton only falls back to ``<backend_dir>/onnxruntime/model.py`` when no native
``libtriton_onnxruntime.so`` exists, so the committed ``config.pbtxt`` files (``backend: "onnxruntime"``,
``model.onnx``) load unchanged in the NGC container, where the native backend serves them.

Speed matters here (perf target: served >= 0.7x in-process): every request Triton hands to one
``execute`` call is concatenated into ONE session run, and outputs are split back by batch size.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

#: Drills set this (never set in normal serving): a file named after the model inside it switches on a
#: fault ("fail": every request errors, "wrong": answers are scrambled, "hang": execution blocks while the
#: file says so, as a hung GPU kernel does, and Triton's health endpoints keep answering) - the honest
#: stand-in for a GPU that fell off the bus or hung while the process stays alive.
FAULT_DIR_ENV = "RECSERVE_FAULT_DIR"
#: The longest a "hang" holds one execution (bounded, so a forgotten switch cannot hold a server for ever).
HANG_MAX_S = 300.0


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    """Serves one ONNX file with onnxruntime on CPU."""

    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        filename = self.config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(f"model '{self.name}': file not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(_param(self.config, "intra_op_thread_count", "1"))
        opts.inter_op_num_threads = int(_param(self.config, "inter_op_thread_count", "1"))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle intra-op threads spin by default; on a small CPU host that burns the cores tritonserver and
        # the other model instances need (matters only with intra_op_thread_count > 1).
        opts.add_session_config_entry("session.intra_op.allow_spinning", _param(self.config, "allow_spinning", "0"))
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        # 0: the config's dims are the full shapes; requests are never concatenated nor split by a batch dimension
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        if set(self.input_names) != graph_inputs or not set(self.output_names) <= graph_outputs:
            raise pb_utils.TritonModelException(
                f"model '{self.name}': config inputs {sorted(self.input_names)} / outputs {sorted(self.output_names)} "
                f"do not match {path}: inputs {sorted(graph_inputs)} / outputs {sorted(graph_outputs)}"
            )
        self.fault_file = os.path.join(os.environ[FAULT_DIR_ENV], self.name) if os.environ.get(FAULT_DIR_ENV) else None

    def _fault(self) -> str | None:
        if self.fault_file is None or not os.path.exists(self.fault_file):
            return None
        with open(self.fault_file) as f:
            return f.read().strip() or "fail"

    def execute(self, requests: list) -> list:
        fault = self._fault()
        if fault == "hang":
            until = time.monotonic() + HANG_MAX_S
            while fault == "hang" and time.monotonic() < until:
                time.sleep(0.05)
                fault = self._fault()
        if fault == "fail":
            err = pb_utils.TritonError(f"model '{self.name}': device failure (injected by a drill)")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        feeds_per_request = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests
        ]
        if not self.batched:  # a model without a batch dimension: one session run per request, outputs whole
            return [self._run_alone(feeds, fault) for feeds in feeds_per_request]
        sizes = [f[self.input_names[0]].shape[0] for f in feeds_per_request]
        try:
            if len(requests) == 1:
                outputs = self.session.run(self.output_names, feeds_per_request[0])
            else:
                feeds = {n: np.concatenate([f[n] for f in feeds_per_request]) for n in self.input_names}
                outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own types; answer each request, keep serving
            err = pb_utils.TritonError(f"model '{self.name}': {exc}", pb_utils.TritonError.INVALID_ARG)
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        if fault == "wrong":
            outputs = [np.flip(o, axis=-1).copy() for o in outputs]
        responses = []
        start = 0
        for size in sizes:
            chunk = zip(self.output_names, outputs, strict=True)
            tensors = [pb_utils.Tensor(n, o[start : start + size]) for n, o in chunk]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _run_alone(self, feeds: dict, fault: str | None):
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # as in execute: answer this request, keep serving
            err = pb_utils.TritonError(f"model '{self.name}': {exc}", pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(error=err)
        if fault == "wrong":
            outputs = [np.flip(o, axis=-1).copy() for o in outputs]
        tensors = [pb_utils.Tensor(n, o) for n, o in zip(self.output_names, outputs, strict=True)]
        return pb_utils.InferenceResponse(output_tensors=tensors)
