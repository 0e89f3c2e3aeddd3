"""Decoding the Kubernetes protobuf bodies that client-go sends for core types.

helm's release storage (Secrets) and `kubectl create secret` send
`application/vnd.kubernetes.protobuf`: the magic `k8s\\0`, then a runtime.Unknown message
{1: TypeMeta{1: apiVersion, 2: kind}, 2: raw object bytes}. Field numbers below are those
of k8s.io/api/core/v1/generated.proto and apimachinery's ObjectMeta.

EMULATED: only Secret, ConfigMap, Namespace and ServiceAccount, and only the ObjectMeta
fields clients set on create (name, generateName, namespace, resourceVersion, labels,
annotations, finalizers).
"""

from __future__ import annotations

import base64

MAGIC = b"k8s\x00"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> dict[int, list]:
    """One message's fields: number -> values (ints for varints, bytes for the rest)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _text(values: list | None) -> str | None:
    return values[-1].decode() if values else None


def _map(entries: list | None, decode_value) -> dict:
    result = {}
    for entry in entries or []:
        pair = fields(entry)
        result[_text(pair.get(1)) or ""] = decode_value(pair.get(2, [b""])[-1])
    return result


def _meta(data: bytes) -> dict:
    f = fields(data)
    meta = {"name": _text(f.get(1)), "generateName": _text(f.get(2)), "namespace": _text(f.get(3)),
            "resourceVersion": _text(f.get(6)),
            "labels": _map(f.get(11), bytes.decode), "annotations": _map(f.get(12), bytes.decode),
            "finalizers": [v.decode() for v in f.get(14, [])]}
    return {k: v for k, v in meta.items() if v}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _secret(f: dict) -> dict:
    obj = {"data": _map(f.get(2), _b64), "type": _text(f.get(3)), "stringData": _map(f.get(4), bytes.decode)}
    if f.get(5):
        obj["immutable"] = bool(f[5][-1])
    return obj


def _configmap(f: dict) -> dict:
    obj = {"data": _map(f.get(2), bytes.decode), "binaryData": _map(f.get(3), _b64)}
    if f.get(4):
        obj["immutable"] = bool(f[4][-1])
    return obj


def _serviceaccount(f: dict) -> dict:
    return {"imagePullSecrets": [{"name": _text(fields(ref).get(1))} for ref in f.get(3, [])]}


BODIES = {"Secret": _secret, "ConfigMap": _configmap, "Namespace": lambda f: {}, "ServiceAccount": _serviceaccount}


def decode(body: bytes) -> dict:
    """A protobuf request body as the JSON object it stands for."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf body")
    unknown = fields(body[len(MAGIC):])
    type_meta = fields(unknown[1][-1])
    api_version, kind = _text(type_meta.get(1)), _text(type_meta.get(2))
    if kind not in BODIES:
        raise ValueError(f"protobuf bodies of kind {kind} are not emulated")
    raw = fields(unknown[2][-1])
    obj = {"apiVersion": api_version, "kind": kind, "metadata": _meta(raw[1][-1]) if 1 in raw else {}}
    obj.update({k: v for k, v in BODIES[kind](raw).items() if v not in (None, {}, [])})
    return obj
