"""Linear behaviour probes on pooled hidden states: collect, train, save/load (Wang et al. 2024, arXiv 2407.08770)."""

from .artifact import Probe, ProbeMeta, load_probe, save_probe
from .collect import encode_examples, pool, pooled_hidden_states
from .probe_train import ProbeOptions, ProbeReport, train_probe_checkpoint
from .train import FittedProbe, fit_paper_probe, fit_probe

__all__ = [
    "FittedProbe",
    "Probe",
    "ProbeMeta",
    "ProbeOptions",
    "ProbeReport",
    "encode_examples",
    "fit_paper_probe",
    "fit_probe",
    "load_probe",
    "pool",
    "pooled_hidden_states",
    "save_probe",
    "train_probe_checkpoint",
]
