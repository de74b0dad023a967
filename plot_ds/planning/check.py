"""plot-train's plan, made before any weight is read: printed on rank 0, and a run predicted not to
fit refused with the nearest fixes (``plan.check``), so that it fails in seconds, not minutes into
a job that waited in a queue."""

from __future__ import annotations

from ..config import Config
from ..errors import MemoryPlanError
from .fixes import nearest_fixes
from .memory_plan import CUDA_RUNTIME_GB, GIB, DataLengths, Machine, MemoryPlan, plan_memory
from .model_shape import ShapeUnknown, read_model_shape


def process_status_gb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in GiB (VmRSS: resident now; VmHWM: its high-water mark),
    or 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def machine_of_run(config: Config, world_size: int, ranks_per_node: int, device_type: str) -> Machine:
    """This launch: on an accelerator its memory (or plan.device_memory_gb); on a CPU the stated
    memory only, and this process's own resident memory as the runtime."""
    gpu = device_type != "cpu"
    memory = config.plan.device_memory_gb
    if memory is None and gpu:
        from deepspeed.accelerator import get_accelerator

        memory = get_accelerator().total_memory() / GIB
    runtime = CUDA_RUNTIME_GB if gpu else resident_after_imports(config)
    return Machine(world_size, ranks_per_node, "gpu" if gpu else "cpu", memory, None, runtime)


def resident_after_imports(config: Config) -> float:
    """This process's resident memory once the libraries the run imports later are loaded too
    (peft for adapters is over 100 MiB), so that the plan's runtime is the process's own."""
    import torch.utils.tensorboard  # noqa: F401

    if config.adapter.active:
        import peft  # noqa: F401
    return process_status_gb("VmRSS")


def plan_before_loading(
    config: Config, machine: Machine, examples, ds_config: dict, is_main: bool
) -> MemoryPlan | None:
    """The run's plan for ``examples`` (its training pairs); a ``MemoryPlanError`` naming the
    nearest fixes where it does not fit and ``plan.check`` is refuse."""
    if config.plan.check == "off" or not examples:
        return None
    model = config.model
    try:
        shape = read_model_shape(model.name_or_path, model.revision, model.trust_remote_code)
    except ShapeUnknown as err:
        if is_main:
            print(f"[plot_ds] warning: no memory plan ({err}); training goes on without one", flush=True)
        return None
    lengths = DataLengths.of_examples(examples)
    plan = plan_memory(config, shape, machine, lengths, ds_config)
    if is_main:
        print(f"[plot_ds] memory plan: {plan.one_line()}", flush=True)
    if plan.fits is not False:
        return plan
    fixes = nearest_fixes(config, shape, machine, lengths)
    advice = "; ".join(fix.describe() for fix in fixes) or "none of plot-plan's fixes fits: more or larger devices"
    message = (
        f"the memory plan predicts {plan.peak_gb:.2f} GiB per rank at {plan.peak_phase}, over the "
        f"{machine.device_memory_gb:g} GiB available. Nearest fixes: {advice}. plot-plan shows every "
        "part; plan.check warn runs anyway"
    )
    if config.plan.check == "refuse":
        raise MemoryPlanError(message)
    if is_main:
        print(f"[plot_ds] warning: {message}", flush=True)
    return plan
