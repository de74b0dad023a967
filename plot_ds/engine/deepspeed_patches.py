"""Every place plot_ds reaches into DeepSpeed's internals, each with why and the versions checked.

No other module of plot_ds names a private DeepSpeed attribute or imports from DeepSpeed's
internal packages (tests/test_architecture.py checks). Each patch below was read against, and
tested on, the DeepSpeed versions in ``CHECKED_VERSIONS``. On any other version the patches still
apply where the code they wrap is found (each is guarded), but ``check_deepspeed_version`` warns
once, naming them: DeepSpeed may have fixed what they work around, or moved what they touch.

| patch | touches | why |
| --- | --- | --- |
| ``keep_one_fp32_copy`` | ``Stage3._create_fp32_partitions`` | fp32 ZeRO-3 kept a second fp32 copy of every partition |
| ``hand_over_gradients_as_views`` | ``Stage3._prepare_fp32_grad_for_sub_group`` | a flattened copy of every gradient at the step |
| ``forget_destroyed_engine`` | ``parameter_offload.FWD_MODULE_STACK``, the coordinator's release-plan cache | a destroyed engine's weights stayed alive |
| ``reading_checkpoints_as_data`` | ``engine.checkpoint_engine.load``, ``torch.load`` in DeepSpeed's loaders | DeepSpeed unpickles its files |
| ``load_universal_next`` | ``engine._config.load_universal_checkpoint`` | resuming with another number of ranks |
| ``skip_shm_op_build`` | ``deepspeed.comm.torch.build_shm_op`` | minutes of C++ compiling for an op training never calls |
| ``tell_cpu_accelerator_local_size`` | ``LOCAL_SIZE``, read by the CPU accelerator | a subprocess per gradient bucket |
"""

from __future__ import annotations

import functools
import importlib
import os
import types
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import CheckpointError

CHECKED_VERSIONS = ("0.19.",)  # version prefixes: 0.19.0 to 0.19.8 read, 0.19.8 tested
PATCHES = (
    "keep_one_fp32_copy",
    "hand_over_gradients_as_views",
    "forget_destroyed_engine",
    "reading_checkpoints_as_data",
    "load_universal_next",
    "skip_shm_op_build",
    "tell_cpu_accelerator_local_size",
)


def version_warning(version: str) -> str | None:
    """The warning for a DeepSpeed ``version`` the patches were not checked on, else None."""
    if version.startswith(CHECKED_VERSIONS):
        return None
    return (
        f"DeepSpeed {version}: plot_ds patches DeepSpeed internals ({', '.join(PATCHES)}) that were checked "
        f"on DeepSpeed {', '.join(v + 'x' for v in CHECKED_VERSIONS)} only (plot_ds/engine/deepspeed_patches.py "
        "says why each exists). They are applied only where the code they wrap is found; check memory "
        "(bench/zero3_memory.py) and the tests before trusting this version, or install deepspeed 0.19.x"
    )


@functools.cache
def check_deepspeed_version() -> None:
    import deepspeed

    message = version_warning(deepspeed.__version__)
    if message:
        warnings.warn(message, stacklevel=2)


# ------------------------------------------------------------------------- ZeRO-3 optimizer
def _wrap_once(cls, name: str, make_wrapper) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "plot_ds_patch", False):
        return  # gone in this version (check_deepspeed_version warned), or already wrapped
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.plot_ds_patch = True
    setattr(cls, name, wrapper)


def keep_one_fp32_copy() -> None:
    """Make ZeRO-3 reuse an fp32 partition as its fp32 master weights.

    DeepSpeed 0.19 means to (stage3.py, ``_create_fp32_partitions``) but compares the partition's
    ``torch.device`` with the accelerator's device-name string, which is never equal, so fp32
    training keeps a second full copy of every partition. Comparing devices as devices removes it;
    bf16/fp16 partitions and offloaded optimizers take DeepSpeed's own branches unchanged.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    def make(original):
        def create_fp32_partitions(self):
            name = self.device
            if not self.offload_optimizer and isinstance(name, str):
                self.device = torch.device(name)
            try:
                return original(self)
            finally:
                self.device = name

        return create_fp32_partitions

    _wrap_once(Stage3, "_create_fp32_partitions", make)


def contiguous_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over tensors that lie back to back in one storage, in order; else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for tensor in tensors:
        if (
            tensor.dtype != first.dtype
            or not tensor.is_contiguous()
            or tensor.data_ptr() != end
            or tensor.untyped_storage().data_ptr() != storage
        ):
            return None
        end += tensor.numel() * tensor.element_size()
    return first.as_strided((sum(t.numel() for t in tensors),), (1,))


def hand_over_gradients_as_views() -> None:
    """Give ZeRO-3's optimizer its gradient partition as a view of DeepSpeed's gradient buffer.

    DeepSpeed 0.19 (stage3.py, ``_prepare_fp32_grad_for_sub_group``) flattens the per-parameter
    gradient partitions into a new tensor before the optimizer step, although they already lie back
    to back in one flat buffer: a transient copy of every gradient, the peak of a step with a
    precomputed reference. Where the partitions are one contiguous run of the optimizer's dtype and
    device, the view is handed over instead; the buffer is overwritten by the next backward, as the
    copy would have been dropped. Otherwise DeepSpeed's own code runs.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    def make(original):
        def prepare_fp32_grad(self, sub_group_id):
            master = self.fp32_partitioned_groups_flat[sub_group_id]
            view = contiguous_span(self.averaged_gradients[sub_group_id])
            if view is None or (view.dtype, view.device, view.numel()) != (master.dtype, master.device, master.numel()):
                return original(self, sub_group_id)
            master.grad = view
            self.averaged_gradients[sub_group_id] = None

        return prepare_fp32_grad

    _wrap_once(Stage3, "_prepare_fp32_grad_for_sub_group", make)


def apply_training_patches() -> None:
    """The patches a policy engine needs, before ``deepspeed.initialize``."""
    check_deepspeed_version()
    keep_one_fp32_copy()
    hand_over_gradients_as_views()


# ------------------------------------------------------------------------- engine lifetime
def forget_destroyed_engine(module) -> None:
    """Drop what DeepSpeed 0.19's ZeRO-3 keeps of an engine after ``engine.destroy()``.

    It stays reachable in two places: its top module on a module-global stack
    (``parameter_offload.FWD_MODULE_STACK``, never popped) and its parameter coordinator in a method
    cache: ``PartitionedParameterCoordinator.__params_to_release`` is memoised with an unbounded
    ``functools.lru_cache`` keyed by the coordinator, whose parameter trace holds every weight.
    Clearing the cache costs the live engines one recomputation of their release plans.
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [entry for entry in stack if entry is not module]
    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    cells = getattr(method, "__closure__", None) or ()  # under DeepSpeed's nvtx wrapper
    for candidate in (method, *(cell.cell_contents for cell in cells if _cell_is_set(cell))):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------- checkpoint files
def _deepspeed_state_classes() -> list:
    """The only non-builtin types in DeepSpeed's files: plain state holders, safe to allow."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 with 16-bit weights: two ints

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_TORCH_LOAD = torch.load


def load_as_data(path, map_location=None, **kwargs):
    """``torch.load`` as plain data (weights_only=True), whatever the caller asked for."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as err:
        raise CheckpointError(f"{path}: not loadable as plain data (weights_only=True): {err}") from None


@contextmanager
def reading_checkpoints_as_data(engine=None) -> Iterator[None]:
    """Within the block DeepSpeed reads its files with ``weights_only=True``: its checkpoint
    engine's ``load`` (which unpickles) and the ``torch.load`` its universal-checkpoint converter and
    ``zero_to_fp32`` call directly, through the ``torch`` module they share."""
    if engine is not None:
        engine.checkpoint_engine.load = types.MethodType(
            lambda self, path, map_location=None: load_as_data(path, map_location), engine.checkpoint_engine
        )
    original, torch.load = torch.load, load_as_data
    try:
        yield
    finally:
        torch.load = original


def load_universal_next(engine) -> None:
    """Make the engine's next ``load_checkpoint`` read DeepSpeed's universal format: the only switch
    is the private config flag its loader reads (DeepSpeed 0.19 has no argument for it)."""
    engine._config.load_universal_checkpoint = True


def convert_to_universal(source: str, target: str) -> None:
    """DeepSpeed's ``ds_to_universal`` converter, called as its command line would, files read as
    plain data."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=source,
        output_folder=target,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with reading_checkpoints_as_data():
        ds_to_universal.main(args)


def merged_fp32_state_dict(checkpoint_root: str, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights merged from every rank's ZeRO partitions of a checkpoint, in one process,
    files read as plain data (``zero_to_fp32``)."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    with reading_checkpoints_as_data():
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint_root, tag=tag)


# ------------------------------------------------------------------------- process start (CPU)
def skip_shm_op_build() -> None:
    """On CPU, DeepSpeed's communication setup compiles a C++ shared-memory all-reduce (minutes on
    first use) that only its inference all-reduce calls; training never does.
    (importlib: ``import deepspeed.comm.torch as m`` would bind the torch package instead.)"""
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def tell_cpu_accelerator_local_size() -> None:
    """DeepSpeed's CPU accelerator counts "devices" by running lscpu/numactl in a subprocess unless
    ``LOCAL_SIZE`` says how many ranks share the host, and ZeRO-3 asks at every gradient bucket
    (hundreds of forks per step). torchrun and our MPI path know the number; DeepSpeed's launcher
    sets it itself."""
    local_size = os.environ.get("LOCAL_WORLD_SIZE") or ("1" if os.environ.get("WORLD_SIZE") == "1" else None)
    if local_size and "LOCAL_SIZE" not in os.environ:
        os.environ["LOCAL_SIZE"] = local_size
