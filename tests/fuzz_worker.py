"""Fuzz worker run by `test_fuzz_formats.py` in a subprocess, so that a crash fails the test.

It saves valid `BlockSparseLinear` files and state dicts, mutates them one field at a time (tensor
values, dtypes and shapes, the layer metadata, the safetensors header and the raw bytes), loads
each result through the public API and checks it was either

- refused with a `ValueError`/`TypeError` whose message names a field (a state dict missing a
  key gets torch's own strict-load `RuntimeError`, which names it), or
- accepted, and the layer's output equals a float64 dense product of what the file held, built
  here by plain Python loops after checking the BSR invariants independently.

    python tests/fuzz_worker.py {cpu,triton} SEED CASES

prints one JSON line: counts by outcome and the failures (empty when all is well).
"""

from __future__ import annotations

import json
import random
import struct
import sys
import tempfile
from pathlib import Path

import torch

from nn_blocksparse import BlockSparseLinear

METADATA_KEY = "nn_blocksparse.BlockSparseLinear"
BLOCK_FIELDS = ("values", "row_offsets", "col_indices", "row_order")
FIELD_WORDS = (*BLOCK_FIELDS, "bias", "metadata", "in_features", "out_features", "block_size", "activation",
               "shape", "JSON", "not a readable safetensors file", "not a BlockSparseLinear file", "expected the tensors")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---------------------------------------------------------------------------------- valid inputs
def valid_layer(rng: random.Random, backend: str) -> BlockSparseLinear:
    block_size = rng.choice((16, 32, 32, 64))
    n = block_size * rng.randint(1, 4)
    k = block_size * rng.randint(1, 4)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    keep = torch.rand(n // block_size, k // block_size, generator=generator) < rng.choice((0.3, 0.6, 1.0))
    weight = torch.randn(n, k, generator=generator) / k**0.5
    weight = weight * keep.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    dtype = rng.choice((torch.float32, torch.float32, torch.float16))
    bias = torch.randn(n, generator=generator) if rng.random() < 0.7 else None
    return BlockSparseLinear.from_dense(weight.to(dtype), None if bias is None else bias.to(dtype), block_size,
                                        activation=rng.choice((None, "gelu")), backend=backend)


# ---------------------------------------------------------------------------------- mutations
def mutate_tensor(tensor: torch.Tensor, rng: random.Random, limit: int) -> tuple[str, torch.Tensor | None]:
    """One random change of a tensor; `limit` is a bound the field's entries should respect."""
    tensor = tensor.clone()
    kind = rng.choice(("set", "set", "swap", "shift", "dtype", "truncate", "extend", "reshape", "empty",
                       "shuffle", "drop"))
    if kind in ("set", "swap", "shift", "shuffle") and tensor.numel() == 0:
        kind = "extend"
    flat = tensor.view(-1)
    if kind == "set":
        i = rng.randrange(flat.numel())
        if tensor.is_floating_point():
            flat[i] = rng.uniform(-3, 3)
        else:
            flat[i] = rng.choice((-1, limit, limit + 1, rng.randrange(max(limit, 1)), -2**31, 2**31 - 1))
    elif kind == "swap":
        i, j = rng.randrange(flat.numel()), rng.randrange(flat.numel())
        flat[i], flat[j] = flat[j].clone(), flat[i].clone()
    elif kind == "shift":
        tensor = tensor + rng.choice((1, -1))
    elif kind == "dtype":
        choices = ((torch.int32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.uint8)
                   if tensor.is_floating_point() else (torch.int64, torch.int16, torch.uint8, torch.float32))
        tensor = tensor.to(rng.choice(choices))
    elif kind == "truncate":
        tensor = tensor[: max(tensor.shape[0] - rng.randint(1, 2), 0)] if tensor.dim() else tensor
    elif kind == "extend":
        tensor = torch.cat([tensor, tensor[:1] if tensor.numel() else torch.zeros((1, *tensor.shape[1:]),
                                                                                    dtype=tensor.dtype)])
    elif kind == "reshape":
        tensor = tensor.reshape(1, -1) if tensor.dim() == 1 else tensor.reshape(-1)
    elif kind == "empty":
        tensor = tensor[:0]
    elif kind == "shuffle":
        tensor = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(rng.randrange(99)))].view(
            tensor.shape)
    elif kind == "drop":
        return kind, None
    return kind, tensor.contiguous()


def mutate_metadata(config: dict, rng: random.Random) -> tuple[str, str]:
    config = dict(config)
    kind = rng.choice(("json", "list", "missing", "extra", "type", "size", "size", "block_size", "activation",
                       "bias_flag"))
    if kind == "json":
        return kind, json.dumps(config)[: rng.randint(0, 20)]
    if kind == "list":
        return kind, json.dumps(list(config.values()))
    if kind == "missing":
        config.pop(rng.choice(sorted(config)))
    elif kind == "extra":
        config["rows_per_program"] = 2
    elif kind == "type":
        config[rng.choice(sorted(config))] = rng.choice(("32", 32.0, True, None, [32]))
    elif kind == "size":
        name = rng.choice(("in_features", "out_features"))
        config[name] = rng.choice((config[name] + config["block_size"], config[name] - config["block_size"], 0, -32,
                                   2**31, 2**40, config[name] + 1))
    elif kind == "block_size":
        config["block_size"] = rng.choice((16, 32, 64, 48, 0, 128))
    elif kind == "activation":
        config["activation"] = rng.choice((None, "gelu", "relu", "GELU"))
    elif kind == "bias_flag":
        config["bias"] = not config["bias"]
    return kind, json.dumps(config)


def mutate_header(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A change of the safetensors header itself (shape, dtype or offsets of one tensor)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = rng.choice([key for key in header if key != "__metadata__"])
    entry = header[name]
    kind = rng.choice(("shape", "dtype", "offsets", "huge"))
    if kind == "shape":
        entry["shape"] = [max(d + rng.choice((-1, 1)), 0) for d in entry["shape"]] or [1]
    elif kind == "dtype":
        entry["dtype"] = rng.choice(("I64", "F64", "I8", "BOOL", "F16", "BF16", "X9"))
    elif kind == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = [start, end + rng.choice((-4, 4, 2**40))]
    else:
        entry["shape"] = [2**31, 2**31]
    raw = json.dumps(header).encode()
    return f"header-{kind}", struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(("truncate", "flip", "flip_data"))
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length if kind == "flip_data" and len(data) > 8 + length else 0
    end = len(data) if kind == "flip_data" else 8 + length
    i = rng.randrange(start, end)
    return kind, data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]


# ---------------------------------------------------------------------------------- the reference
def independent_dense(tensors: dict, config: dict) -> torch.Tensor | str:
    """The float64 `[N, K]` weight the tensors describe, or why they describe none (never raises)."""
    n, k, bs = config["out_features"], config["in_features"], config["block_size"]
    values, offsets, cols, order = (tensors.get(name) for name in BLOCK_FIELDS)
    if any(t is None for t in (values, offsets, cols, order)):
        return "a block tensor is missing"
    if any(t.dtype != torch.int32 for t in (offsets, cols, order)) or not values.is_floating_point():
        return "dtype"
    if bs not in (16, 32, 64) or n % bs or k % bs or not 0 <= n < 2**31 or not 0 <= k < 2**31:
        return "shape"
    if values.dim() != 3 or tuple(values.shape[1:]) != (bs, bs):
        return "values shape"
    offsets, cols, order = offsets.tolist(), cols.tolist(), order.tolist()
    rows = n // bs
    if len(offsets) != rows + 1 or offsets[0] != 0 or offsets[-1] != values.shape[0] or len(cols) != values.shape[0]:
        return "row_offsets"
    if any(a > b for a, b in zip(offsets, offsets[1:])):
        return "row_offsets order"
    if sorted(order) != list(range(rows)):
        return "row_order"
    weight = torch.zeros(n, k, dtype=torch.float64)
    for r in range(rows):
        previous = -1
        for i in range(offsets[r], offsets[r + 1]):
            c = cols[i]
            if not previous < c < k // bs:
                return "col_indices"
            previous = c
            weight[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs] = values[i].double()
    return weight


def check_output(layer: BlockSparseLinear, weight: torch.Tensor, bias, activation, rng: random.Random) -> str | None:
    """None if the layer's output matches the float64 reference, else what went wrong."""
    dtype = layer.values.dtype
    x = torch.randn(rng.randint(1, 5), layer.in_features, generator=torch.Generator().manual_seed(rng.randrange(99)))
    if dtype not in KERNEL_DTYPES:
        try:
            with torch.inference_mode():
                layer(x.to(dtype))
        except TypeError as err:
            return None if "dtype" in str(err) else f"unclear dtype error: {err}"
        return f"a {dtype} layer ran"
    x = x.to(dtype)
    with torch.inference_mode():
        y = layer(x)
    reference = x.double() @ weight.T
    if bias is not None:
        reference = reference + bias.double()
    if activation == "gelu":
        reference = torch.nn.functional.gelu(reference)
    # The layer keeps its weights in its own dtype: round the reference's inputs the same way.
    error = (y.double() - reference).abs().max().item() if y.numel() else 0.0
    scale = max(reference.abs().max().item() if reference.numel() else 0.0, 1.0)
    if not error <= TOLERANCE[dtype] * scale * 4:
        return f"output off by {error:.3g} (scale {scale:.3g}, {dtype})"
    return None


# ---------------------------------------------------------------------------------- one case
def judge_refusal(err: Exception) -> str | None:
    if not isinstance(err, (ValueError, TypeError)):
        return f"{type(err).__name__} is not a ValueError/TypeError: {err}"
    if not any(word in str(err) for word in FIELD_WORDS):
        return f"the message names no field: {err}"
    return None


def file_case(rng: random.Random, backend: str, folder: Path) -> tuple[str, str | None, str]:
    from safetensors.torch import load_file, save_file

    layer = valid_layer(rng, backend)
    tensors = {name: t.detach().clone() for name, t in layer.state_dict().items()}
    config = layer.config_dict()
    metadata = {METADATA_KEY: json.dumps(config)}
    target = rng.choice((*BLOCK_FIELDS, *BLOCK_FIELDS, "bias", "metadata", "metadata", "header", "bytes"))
    limits = {"values": 1, "row_offsets": layer.values.shape[0], "col_indices": layer.in_features // layer.block_size,
              "row_order": layer.out_features // layer.block_size, "bias": 1}
    what = target
    if target in limits and (target != "bias" or "bias" in tensors):
        kind, tensor = mutate_tensor(tensors[target], rng, limits[target])
        what = f"{target}-{kind}"
        if tensor is None:
            del tensors[target]
        else:
            tensors[target] = tensor
    elif target == "metadata":
        kind, metadata[METADATA_KEY] = mutate_metadata(config, rng)
        what = f"metadata-{kind}"
    file = folder / f"case{rng.randrange(10**9)}.safetensors"
    save_file(tensors, str(file), metadata=metadata)
    if target in ("header", "bytes"):
        what, data = (mutate_header if target == "header" else mutate_bytes)(file.read_bytes(), rng)
        file.write_bytes(data)
    try:
        loaded = BlockSparseLinear.load(file, backend=backend)
    except Exception as err:  # noqa: BLE001 - judged, not swallowed
        file.unlink()
        return "refused", judge_refusal(err), what
    # Accepted: what safetensors itself reads from the file must be a valid matrix, equal in output.
    from safetensors import safe_open

    read = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        stored = json.loads(f.metadata()[METADATA_KEY])
    file.unlink()
    weight = independent_dense(read, stored)
    if isinstance(weight, str):
        return "accepted", f"accepted a file whose {weight} is invalid", what
    return "accepted", check_output(loaded, weight, read.get("bias"), stored["activation"], rng), what


def state_dict_case(rng: random.Random, backend: str) -> tuple[str, str | None, str]:
    source = valid_layer(rng, backend)
    layer = BlockSparseLinear(source.in_features, source.out_features, bias=source.bias is not None,
                              block_size=source.block_size, activation=source.activation, backend=backend,
                              dtype=source.values.dtype)
    state = {name: t.detach().clone() for name, t in source.state_dict().items()}
    target = rng.choice((*BLOCK_FIELDS, "bias") if "bias" in state else BLOCK_FIELDS)
    limits = {"values": 1, "row_offsets": source.values.shape[0], "bias": 1,
              "col_indices": source.in_features // source.block_size,
              "row_order": source.out_features // source.block_size}
    kind, tensor = mutate_tensor(state[target], rng, limits[target])
    if tensor is None and target == "bias":
        kind, tensor = "shift", state[target] + 1  # a missing bias is torch's own strict-load error
    if tensor is None:
        del state[target]
    else:
        state[target] = tensor
    what = f"state-{target}-{kind}"
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    try:
        layer.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - judged, not swallowed
        if tensor is None and isinstance(err, RuntimeError) and f'Missing key(s) in state_dict: "{target}"' in str(err):
            return "refused", None, what  # torch's own strict-load error for a missing key, naming it
        problem = judge_refusal(err)
        after = layer.state_dict()
        unchanged = before.keys() == after.keys() and all(
            before[name].shape == t.shape and torch.equal(before[name], t) for name, t in after.items())
        return "refused", problem or (None if unchanged else "a refused state dict changed the layer"), what
    # torch's load casts floating tensors to the layer's dtype: so does the reference.
    cast = {name: t.to(layer.values.dtype) if t.is_floating_point() else t for name, t in state.items()}
    weight = independent_dense(cast, layer.config_dict())
    if isinstance(weight, str):
        return "accepted", f"accepted a state dict whose {weight} is invalid", what
    return "accepted", check_output(layer, weight, cast.get("bias"), layer.activation, rng), what


def main() -> None:
    backend, seed, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    backend = {"cpu": "auto", "triton": "triton"}[backend]
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    failures = []
    with tempfile.TemporaryDirectory() as folder:
        for case in range(cases):
            outcome, problem, what = (file_case(rng, backend, Path(folder)) if case % 3 else
                                      state_dict_case(rng, backend))
            counts[outcome] = counts.get(outcome, 0) + 1
            counts[what.split("-")[0]] = counts.get(what.split("-")[0], 0) + 1
            if problem is not None:
                failures.append(f"case {case} ({what}, {outcome}): {problem}"[:400])
    print(json.dumps({"counts": counts, "failures": failures}))


if __name__ == "__main__":
    main()
