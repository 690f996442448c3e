"""A one-convolution ONNX model, encoded by hand, for probing execution providers.

``dclgan doctor`` must run on a serving-only install, where the ``onnx`` package (a training extra) is
absent, so the model is written here as protobuf bytes: ten lines of wire format instead of a dependency.
It is a Conv rather than an Identity so that a CUDA session really calls cuDNN when it runs: a provider
whose libraries load but whose kernels cannot run fails the probe too.
"""

from __future__ import annotations

import struct

_VARINT, _BYTES = 0, 2
_FLOAT = 1  # TensorProto.DataType.FLOAT
INPUT_NAME, OUTPUT_NAME = "x", "y"
INPUT_SHAPE = (1, 1, 4, 4)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an int as a varint, bytes/str length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3 | _VARINT) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | _BYTES) + _varint(len(data)) + data


def _float_tensor_type(shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_field(1, _field(1, d)) for d in shape)  # TensorShapeProto.dim[].dim_value
    return _field(1, _field(1, _FLOAT) + _field(2, dims))  # TypeProto.tensor_type{elem_type, shape}


def conv_model(opset: int = 17) -> bytes:
    """ModelProto bytes: ``y = Conv(x, w)`` with x (1, 1, 4, 4) float32 and a 1x1 weight of 2.0."""
    weight = (
        b"".join(_field(1, d) for d in (1, 1, 1, 1))  # dims
        + _field(2, _FLOAT)
        + _field(8, "w")
        + _field(9, struct.pack("<f", 2.0))  # raw_data
    )
    node = _field(1, INPUT_NAME) + _field(1, "w") + _field(2, OUTPUT_NAME) + _field(4, "Conv")
    graph = (
        _field(1, node)
        + _field(2, "doctor_probe")
        + _field(5, weight)  # initializer
        + _field(11, _field(1, INPUT_NAME) + _field(2, _float_tensor_type(INPUT_SHAPE)))
        + _field(12, _field(1, OUTPUT_NAME) + _field(2, _float_tensor_type(INPUT_SHAPE)))
    )
    return _field(1, 8) + _field(8, _field(2, opset)) + _field(7, graph)  # ir_version 8, opset_import, graph
