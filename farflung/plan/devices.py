"""The devices a plan places: a devices file, or N identical devices.

A devices file is JSON::

    {"devices": [
      {"name": "a0", "host": "a", "tflops": 100, "memory_gb": 80},
      {"name": "b0", "host": "b", "speed": 0.5}
    ]}

Per entry: ``name`` (required, unique, non-empty string); ``host`` (default: the
name; devices on one host talk over no emulated link); exactly one of ``tflops``
(peak TFLOPS, > 0) or ``speed`` (relative to a device of :data:`REFERENCE_TFLOPS`,
> 0); ``memory_gb`` (optional, > 0, GB = 1e9 bytes). Every problem is a
:class:`~farflung.config.ConfigError` naming the entry and the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farflung.config import ConfigError, read_json

__all__ = ["DEVICE_KEYS", "REFERENCE_TFLOPS", "Device", "identical_devices", "load_devices"]

REFERENCE_TFLOPS = 100.0
"""Peak TFLOPS of a device of ``speed`` 1 (and of every device without a devices file)."""
DEVICE_KEYS = ("name", "host", "tflops", "speed", "memory_gb")


@dataclass(frozen=True)
class Device:
    """One device: its name, its host, its peak TFLOPS and its memory (GB, or None)."""

    name: str
    host: str
    tflops: float
    memory_gb: float | None = None


def identical_devices(hosts: list[str], tflops: float = REFERENCE_TFLOPS) -> list[Device]:
    """One device per host, all alike, named after the host, memory unknown."""
    return [Device(h, h, tflops) for h in hosts]


def _number(entry: dict, key: str, where: str) -> float | None:
    if key not in entry:
        return None
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ConfigError(f"{where}.{key} must be a number > 0, got {v!r}")
    return float(v)


def _device(entry: Any, i: int, source: str) -> Device:
    where = f"{source}: devices[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(
            f'{where} must be an object like {{"name": "a0", "host": "a", "tflops": 100}}, '
            f"got {entry!r}"
        )
    unknown = sorted(set(entry) - set(DEVICE_KEYS))
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {unknown}; allowed: {', '.join(DEVICE_KEYS)}"
        )
    if "name" not in entry:
        raise ConfigError(f"{where} has no 'name' (a non-empty string, unique in the file)")
    name = entry["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
    where = f"{source}: devices[{i}] ({name!r})"
    host = entry.get("host", name)
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"{where}.host must be a non-empty string, got {host!r}")
    tflops, speed = _number(entry, "tflops", where), _number(entry, "speed", where)
    if tflops is not None and speed is not None:
        raise ConfigError(
            f"{where} has both 'tflops' and 'speed'; give one of them (speed 1 = "
            f"{REFERENCE_TFLOPS:g} TFLOPS)"
        )
    if tflops is None and speed is None:
        raise ConfigError(
            f"{where} has neither 'tflops' nor 'speed'; give one of them (speed 1 = "
            f"{REFERENCE_TFLOPS:g} TFLOPS)"
        )
    if tflops is None:
        tflops = speed * REFERENCE_TFLOPS
    return Device(name, host, tflops, _number(entry, "memory_gb", where))


def devices_from_dict(d: Any, source: str = "devices") -> list[Device]:
    """Validate the file's JSON object (see the module docstring)."""
    if not isinstance(d, dict) or not isinstance(d.get("devices"), list):
        raise ConfigError(
            f"{source}: expected an object with a 'devices' list, e.g. "
            '{"devices": [{"name": "a0", "host": "a", "tflops": 100}]}'
        )
    unknown = sorted(set(d) - {"devices"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; allowed: devices")
    if not d["devices"]:
        raise ConfigError(f"{source}: 'devices' is empty; list at least one device")
    devices = [_device(e, i, source) for i, e in enumerate(d["devices"])]
    seen: dict[str, int] = {}
    for i, dev in enumerate(devices):
        if dev.name in seen:
            raise ConfigError(
                f"{source}: devices[{seen[dev.name]}] and devices[{i}] are both named "
                f"{dev.name!r}; names must be unique"
            )
        seen[dev.name] = i
    return devices


def load_devices(path: str | Path) -> list[Device]:
    """Read and validate a devices file."""
    return devices_from_dict(read_json(path, "devices file"), f"devices file {Path(path)}")
