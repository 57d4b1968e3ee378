"""The CPU inference engines a user would otherwise pick, run on a (resized) BERT: ONNX Runtime, OpenVINO.

Both are optional (`pip install -e ".[engines]"`): `engine_unavailable(name)` says why one cannot
run here (None when it can), so a benchmark skips it with that message instead of failing.

- `export_onnx`: the model's `last_hidden_state` as an ONNX file with dynamic batch and sequence
  axes, through torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which needs
  `onnx` and `onnxscript`) or the TorchScript one (`exporter="legacy"`, needs `onnx`).
- `OnnxRuntimeEngine`: a `CPUExecutionProvider` session, `threads` intra-op threads, one inter-op
  thread, sequential execution, every graph optimisation on (ORT's default level).
- `OpenVinoEngine`: `openvino.convert_model` from the torch module (OpenVINO's PyTorch frontend) or
  from the ONNX file, reshaped to each batch x seq it is asked for (static shapes: OpenVINO's
  latency setting) and compiled for the CPU with `INFERENCE_NUM_THREADS`, `PERFORMANCE_HINT`
  LATENCY and an explicit `INFERENCE_PRECISION_HINT` (f32, or bf16): OpenVINO would otherwise pick
  bf16 by itself on CPUs with bf16 instructions. `precision(...)` reads back what it runs in (a CPU
  without bf16 instructions runs f32 whatever the hint says).

Every engine is called as `engine(inputs)` with a dict of int64 torch tensors (`input_ids`,
`attention_mask`) and returns the last hidden state as a float32 torch tensor; `runner(inputs)`
gives the call to time, with its inputs already converted.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

ENGINES = ("onnxruntime", "openvino")
INPUT_NAMES = ("input_ids", "attention_mask")
EXPORTERS = ("dynamo", "legacy")
OPENVINO_SOURCES = ("torch", "onnx")
OPENVINO_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}
# ONNX opset of the TorchScript exporter (the dynamo exporter picks its own).
LEGACY_OPSET = 17


def _missing(*modules: str) -> list[str]:
    return [module for module in modules if importlib.util.find_spec(module) is None]


def engine_unavailable(name: str, exporter: str = "dynamo", openvino_from: str = "torch") -> str | None:
    """None when engine `name` can run here, else why not (with the pip command that fixes it)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
    needed = [name]
    if name == "onnxruntime" or openvino_from == "onnx":
        needed += ["onnx", "onnxscript"] if exporter == "dynamo" else ["onnx"]
    try:
        missing = _missing(*needed)
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) or a broken install
        missing = needed
    if missing:
        return f"{', '.join(missing)} not installed (pip install {' '.join(missing)})"
    return None


def engine_version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - an optional package that is missing or broken
        return "not installed"


class LastHiddenState(nn.Module):
    """`model(input_ids, attention_mask).last_hidden_state`: the one output every engine is compared on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _example(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(inputs[name] for name in INPUT_NAMES)


def export_onnx(model: nn.Module, example_inputs: dict, path: Path, exporter: str = "dynamo") -> Path:
    """Write `model`'s last hidden state to `path` as ONNX, batch and sequence axes dynamic."""
    import warnings

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    wrapped = LastHiddenState(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings from transformers and torch.onnx
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", max=4096)
            torch.onnx.export(wrapped, _example(example_inputs), str(path), dynamo=True, input_names=list(INPUT_NAMES),
                              output_names=["last_hidden_state"], verbose=False,
                              dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES})
        else:
            torch.onnx.export(wrapped, _example(example_inputs), str(path), dynamo=False, input_names=list(INPUT_NAMES),
                              output_names=["last_hidden_state"], opset_version=LEGACY_OPSET,
                              dynamic_axes={name: {0: "batch", 1: "seq"} for name in INPUT_NAMES})
    return path


def _numpy_feed(inputs: dict) -> dict:
    return {name: inputs[name].to(torch.int64).contiguous().numpy() for name in INPUT_NAMES}


class OnnxRuntimeEngine:
    """An ONNX file on ONNX Runtime's CPU provider, `threads` intra-op threads, sequential (fp32)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def runner(self, inputs: dict) -> Callable[[], object]:
        feed = _numpy_feed(inputs)
        return lambda: self.session.run(None, feed)

    def __call__(self, inputs: dict) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, _numpy_feed(inputs))[0]).float()


class OpenVinoEngine:
    """OpenVINO on the CPU: the converted model compiled once per (batch, seq, precision), LATENCY hint."""

    name = "openvino"

    def __init__(self, model: nn.Module | None, example_inputs: dict, threads: int, source: str = "torch",
                 onnx_path: Path | None = None) -> None:
        import openvino as ov

        if source not in OPENVINO_SOURCES:
            raise ValueError(f"openvino source must be one of {OPENVINO_SOURCES}, got {source!r}")
        self._ov = ov
        self.core = ov.Core()
        self.threads = threads
        if source == "onnx":
            if onnx_path is None:
                raise ValueError("OpenVinoEngine(source='onnx') needs onnx_path")
            self.model = ov.convert_model(str(onnx_path))
        else:
            with torch.no_grad():
                self.model = ov.convert_model(LastHiddenState(model).eval(), example_input=_example(example_inputs))
        self._compiled: dict[tuple, object] = {}

    def compiled(self, batch: int, seq: int, dtype: torch.dtype = torch.float32):
        key = (batch, seq, dtype)
        if key not in self._compiled:
            if dtype not in OPENVINO_PRECISIONS:
                raise ValueError(f"OpenVINO runs {tuple(OPENVINO_PRECISIONS)} here, not {dtype}")
            model = self.model.clone()
            model.reshape({port.get_any_name(): self._ov.PartialShape([batch, seq]) for port in model.inputs})
            self._compiled[key] = self.core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[dtype]})
        return self._compiled[key]

    def precision(self, batch: int, seq: int, dtype: torch.dtype = torch.float32) -> str:
        """The inference precision OpenVINO resolved for this compilation ("f32", "bf16", ...)."""
        resolved = self.compiled(batch, seq, dtype).get_property("INFERENCE_PRECISION_HINT")
        return resolved.get_type_name() if hasattr(resolved, "get_type_name") else str(resolved)

    def _request(self, inputs: dict, dtype: torch.dtype):
        batch, seq = inputs["input_ids"].shape
        return self.compiled(batch, seq, dtype).create_infer_request()

    def runner(self, inputs: dict, dtype: torch.dtype = torch.float32) -> Callable[[], object]:
        request, feed = self._request(inputs, dtype), _numpy_feed(inputs)
        return lambda: request.infer(feed, share_inputs=True)

    def __call__(self, inputs: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        request = self._request(inputs, dtype)
        request.infer(_numpy_feed(inputs))
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).float()
