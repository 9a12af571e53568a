"""Test-only shim that lets Unsloth run on a machine without a GPU (never part of the package).

Put this folder first on PYTHONPATH with FASTSFT_CUDA_SHIM=1, together with UNSLOTH_ALLOW_CPU=1 (Unsloth's
own test switch: its DEVICE_TYPE becomes "cuda" without a driver), TRITON_INTERPRET=1 (Unsloth's and
fastsft's Triton kernels run in Triton's interpreter on CPU tensors) and HF_DEACTIVATE_ASYNC_LOAD=1.
Python imports `sitecustomize` at start-up, so the answers below are in place before anything asks:

- torch.cuda's queries get the answers of one Ampere-like device (properties, capability, count, current
  device and stream, memory statistics), and its housekeeping calls (synchronize, empty_cache,
  set_device, `with torch.cuda.device(...)`) do nothing;
- a TorchFunctionMode maps every "cuda" device a tensor is made on or moved to onto the CPU.

`torch.cuda.is_available()` stays False, so transformers, accelerate and the Trainer keep to the CPU.
"""

import os

if os.environ.get("FASTSFT_CUDA_SHIM") == "1":
    import contextlib
    import types

    import torch
    from torch.overrides import TorchFunctionMode

    _GiB = 2**30
    _PROPS = types.SimpleNamespace(
        name="fastsft CPU shim",
        major=8,
        minor=0,
        total_memory=16 * _GiB,
        multi_processor_count=108,
        max_threads_per_multi_processor=2048,
        regs_per_multiprocessor=65536,
        shared_memory_per_block_optin=163 * 1024,
        L2_cache_size=40 * 2**20,
        warp_size=32,
        gcnArchName="",
        uuid="00000000-0000-0000-0000-000000000000",
        is_integrated=False,
    )

    class _Stream:
        cuda_stream = 0
        device = torch.device("cpu")

        def __init__(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

        def wait_stream(self, other):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class _Device(contextlib.nullcontext):
        def __init__(self, device=None):
            super().__init__()
            self.idx = 0

    def _const(value):
        # a distinct function per name: torch._dynamo keys its rules on the function objects
        return lambda *a, **k: value

    cuda = torch.cuda
    patches = dict(
        get_device_properties=lambda device=None: _PROPS,
        get_device_capability=lambda device=None: (_PROPS.major, _PROPS.minor),
        get_device_name=lambda device=None: _PROPS.name,
        device_count=lambda: 1,
        current_device=lambda: 0,
        mem_get_info=lambda device=None: (12 * _GiB, _PROPS.total_memory),
        memory_stats=lambda device=None: {},
        current_stream=lambda device=None: _Stream(),
        default_stream=lambda device=None: _Stream(),
        Stream=_Stream,
        stream=lambda s=None: contextlib.nullcontext(),
        device=_Device,
        is_current_stream_capturing=lambda: False,
    )
    for _name in (
        "set_device",
        "synchronize",
        "empty_cache",
        "ipc_collect",
        "reset_peak_memory_stats",
        "reset_max_memory_allocated",
        "manual_seed",
        "manual_seed_all",
    ):
        patches[_name] = _const(None)
    for _name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        patches[_name] = _const(0)
    for _name, _fn in patches.items():
        setattr(cuda, _name, _fn)
    torch._C._cuda_getCurrentRawStream = lambda device=None: 0
    torch._C._cuda_getDevice = lambda: 0

    def _cpu(device):
        if isinstance(device, torch.device):
            return torch.device("cpu") if device.type == "cuda" else device
        if isinstance(device, str) and device.startswith("cuda"):
            return torch.device("cpu")
        if isinstance(device, int) and not isinstance(device, bool):
            return torch.device("cpu")  # a bare index means a CUDA device
        return device

    _TO = {torch.Tensor.to, torch.Tensor.cuda}

    class CudaToCpu(TorchFunctionMode):
        """Every tensor made on, or moved to, a "cuda" device lands on the CPU."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            if func is torch.device:
                if args and isinstance(args[0], int):
                    # torch.device(i) is the i-th accelerator; Unsloth indexes its caches by .index
                    return torch.device("cpu", args[0])
                return _cpu(func(*args, **kwargs))
            if func in _TO:
                if func is torch.Tensor.cuda:
                    return args[0]
                args = (args[0],) + tuple(_cpu(a) for a in args[1:])
            return func(*args, **kwargs)

    CudaToCpu().__enter__()  # for the whole process
