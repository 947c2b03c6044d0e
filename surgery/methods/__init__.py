"""The registered repair methods. A method joins by being listed here (see docs/architecture.md)."""

from __future__ import annotations

from ..errors import SurgeryError
from .ablation import DirectionAblation
from .antidote import Antidote
from .base import Edit, Method, Prepared, RepairReport, RunOptions, Strength, run_repair
from .eigenshift import EigenShift
from .interpolate import Interpolate
from .probe_edit import ProbeEdit
from .regmean import RegMean
from .resta import Resta
from .revert import SignConflictRevert
from .safe_delta import SafeDelta
from .safelora import SafeLora

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Antidote(),
        ProbeEdit(),
        DirectionAblation(),
        EigenShift(),
        Resta(),
        SignConflictRevert(),
        SafeLora(),
        Interpolate(),
        SafeDelta(),
        RegMean(),
    )
}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new); returns it, so it can decorate an instance."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SurgeryError(f"unknown method '{name}': one of {', '.join(REGISTRY)}") from None


__all__ = [
    "REGISTRY",
    "Edit",
    "Method",
    "Prepared",
    "RepairReport",
    "RunOptions",
    "Strength",
    "get_method",
    "register",
    "run_repair",
]
