"""Training, as small parts with one job each.

============================  ===============================================================
module                        what it holds
============================  ===============================================================
:mod:`.trainer`               :class:`Trainer` (the flat loop), :class:`TrainResult`
:mod:`.objective`             the loss, the activity penalty, step statistics, the lr schedule
:mod:`.evaluate`              :func:`evaluate`: a model on batches, no Trainer needed
:mod:`.stopping`              signals, stop requests and non-finite losses, agreed by all ranks
:mod:`.checkpoint`            atomic checkpoints, ``weights_only`` loads, RNG streams, the
                              expert-parallel (sharded) layout
:mod:`.sinks`                 TensorBoard and JSON-lines metric sinks
:mod:`.callbacks`             the :class:`Callback` protocol, router balancing, monitors, energy
:mod:`.model_energy`          a model's energy: counted (dense twin, across processes), priced
:mod:`.distributed`           joining a ``torchrun`` job, devices, the model's layout over the
                              processes (DDP, expert parallelism), reductions across ranks
============================  ===============================================================

Only this package uses :mod:`energy` inside ``spiking_moe``; the trainer reads what the model
returns (logits, aux loss, routing, activity) and never hooks into it.
"""

from .callbacks import (
    Callback,
    CallbackContext,
    EnergyReportCallback,
    FiringRateMonitor,
    RouterBiasBalancing,
    RoutingMonitor,
)
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointLayoutError,
    check_single_process,
    gather_expert_checkpoint,
    load_checkpoint,
    previous_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .distributed import (
    DeviceError,
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    init_distributed,
    resolve_device,
)
from .evaluate import EvaluationContext, evaluate, unpack_output
from .model_energy import (
    check_energy_profile,
    count_energy,
    count_operations_parallel,
    energy_metrics,
    energy_profile_names,
    expert_parallel_counts,
    measure_energy,
    profile_precision,
    write_energy_report,
)
from .objective import StepStats, activity_penalty
from .sinks import JSONLinesSink, MetricSink, TensorBoardSink
from .stopping import NonFiniteLossError
from .trainer import Trainer, TrainResult

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "CallbackContext",
    "CheckpointError",
    "CheckpointLayoutError",
    "DeviceError",
    "DistInfo",
    "EnergyReportCallback",
    "EvaluationContext",
    "FiringRateMonitor",
    "JSONLinesSink",
    "MetricSink",
    "NonFiniteLossError",
    "RouterBiasBalancing",
    "RoutingMonitor",
    "StepStats",
    "TensorBoardSink",
    "TrainResult",
    "Trainer",
    "activity_penalty",
    "all_gather_objects",
    "all_reduce_sum",
    "check_energy_profile",
    "check_single_process",
    "count_energy",
    "count_operations_parallel",
    "energy_metrics",
    "energy_profile_names",
    "evaluate",
    "expert_parallel_counts",
    "gather_expert_checkpoint",
    "init_distributed",
    "load_checkpoint",
    "measure_energy",
    "profile_precision",
    "previous_checkpoint",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "unpack_output",
    "write_energy_report",
]
