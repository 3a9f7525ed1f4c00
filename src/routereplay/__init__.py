"""routereplay: record the experts an MoE model chose, replay them in the trainer."""

from routereplay.controller import Mode, ReplayController
from routereplay.errors import (
    LayoutError,
    ReplayError,
    RouteReplayError,
    TraceError,
    TraceFileError,
)
from routereplay.integrations.hf import attach
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit
from routereplay.recording import Recording, Tokens
from routereplay.rollout import Rollout
from routereplay.routing import RouterScores, RouterSpec, Routing, gate_weights, native_ids, select
from routereplay.stats import LayerStats
from routereplay.store import TraceFile, TraceWriter
from routereplay.trace import NO_ROUTE, RoutingTrace, storage_dtype

__version__ = "0.1.0"

__all__ = [
    "NO_ROUTE",
    "LayerStats",
    "LayoutError",
    "MoELayout",
    "Mode",
    "PipelineSplit",
    "Recording",
    "ReplayController",
    "ReplayError",
    "Rollout",
    "RouteReplayError",
    "RouterScores",
    "RouterSpec",
    "Routing",
    "RoutingTrace",
    "Tokens",
    "TraceError",
    "TraceFile",
    "TraceFileError",
    "TraceWriter",
    "__version__",
    "attach",
    "gate_weights",
    "native_ids",
    "select",
    "storage_dtype",
]
