"""Where one call's time goes, for the GPU benchmarks (bench_gpu.py, gpu_fp8.py)."""
import torch


def top_kernels(fn, cuda: bool, n: int = 25, name_chars: int = 90) -> dict:
    """Run fn once under the profiler; its top device kernels by total time (CPU ops without a GPU).
    Kernels only: the device time of aten ops and of annotations (Optimizer.step#AdamW.step) counts
    their kernels again (an H200 run listed both: its 233 ms total counted AdamW twice)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    attr = "device_time_total" if cuda else "cpu_time_total"
    ev = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0 and not getattr(e, "is_user_annotation", False)]
    if cuda:
        ev = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA] or ev
    ev.sort(key=lambda e: -getattr(e, attr))
    return {"total_ms": round(sum(getattr(e, attr) for e in ev) / 1e3, 1),
            "top": [{"name": e.key[:name_chars], "ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count}
                    for e in ev[:n]]}
