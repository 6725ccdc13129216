"""GPU power / energy / utilisation telemetry through NVML (``nvidia-ml-py``), sampled in a
background thread while a benchmark runs.

    >>> from bench.telemetry import PowerSampler
    >>> with PowerSampler(device=0) as ps:
    ...     run_the_workload()
    ...     torch.cuda.synchronize()          # the GPU work must be inside the block
    >>> ps.result(num_samples=4096)
    {'available': True, 'avg_power_w': 412.3, 'energy_j': 86.1, 'energy_per_sample_j': 0.021, ...}

What it measures, between ``__enter__`` and ``__exit__``:

* ``energy_j``: the difference of the board's cumulative energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer) when it exists
  (``energy_source="counter"``), else the trapezoidal integral of the sampled power
  (``"power integral"``).
* ``avg_power_w``: ``energy_j / duration_s``; ``max_power_w``: the largest sampled power
  (``nvmlDeviceGetPowerUsage``; on many boards a ~1 s moving average, so short runs smear).
* ``gpu_util_pct`` / ``mem_util_pct``: mean of ``nvmlDeviceGetUtilizationRates`` samples (the
  share of time a kernel was running / memory was being read or written, over the driver's
  last sample window; it says nothing about how busy the SMs were).
* ``energy_per_sample_j``: ``energy_j / num_samples`` when the caller says how many samples the
  workload produced.

Nothing here ever raises because telemetry is missing: without ``pynvml`` (ImportError), without
the NVML library (``NVMLError_LibraryNotFound``), without a GPU, or when a query is not supported,
every figure is the string ``"n/a"``, ``available`` is False and ``reason`` says why. Importing
this module touches neither NVML nor CUDA. It never changes clocks or any other setting.
"""
from __future__ import annotations

import os
import threading
import time

__all__ = ["PowerSampler", "NA", "nvml_available"]

NA = "n/a"
_FIELDS = ("avg_power_w", "max_power_w", "energy_j", "energy_per_sample_j", "gpu_util_pct",
           "mem_util_pct")


def _nvml():
    """The ``pynvml`` module (``nvidia-ml-py``), initialised; raises on any failure."""
    import pynvml  # noqa: PLC0415 - optional dependency, imported on use
    pynvml.nvmlInit()
    return pynvml


def nvml_available() -> tuple:
    """``(True, driver version)`` or ``(False, reason)``; never raises."""
    try:
        nv = _nvml()
    except Exception as e:  # ImportError, pynvml.NVMLError (LibraryNotFound, DriverNotLoaded...)
        return False, f"{type(e).__name__}: {e}"
    try:
        v = nv.nvmlSystemGetDriverVersion()
        return True, v.decode() if isinstance(v, bytes) else str(v)
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def _handle_for(nv, device):
    """NVML handle of torch CUDA device ``device`` (int / "cuda:k" / torch.device / None = 0).

    Matched by PCI bus id when torch reports it (so CUDA_VISIBLE_DEVICES reordering is honoured),
    else by the k-th entry of CUDA_VISIBLE_DEVICES when it is numeric, else by index k."""
    idx = 0
    if device is not None:
        idx = getattr(device, "index", None) if not isinstance(device, (int, str)) else device
        if isinstance(idx, str):
            idx = int(idx.split(":")[1]) if ":" in idx else 0
        idx = 0 if idx is None else int(idx)
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(idx)
            if hasattr(p, "pci_bus_id") and hasattr(p, "pci_device_id"):
                bus = f"{getattr(p, 'pci_domain_id', 0):08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
                return nv.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if idx < len(entries) and entries[idx].isdigit():
        return nv.nvmlDeviceGetHandleByIndex(int(entries[idx]))
    return nv.nvmlDeviceGetHandleByIndex(idx)


class PowerSampler:
    """Context manager: samples NVML power and utilisation every ``interval_s`` in a daemon
    thread and reads the energy counter at entry and exit. See the module docstring.

    Args:
        device: the torch CUDA device (index, ``"cuda:k"``, ``torch.device``); default 0.
        interval_s: sampling period of the background thread (default 20 ms).
        num_samples: samples the workload produces (for ``energy_per_sample_j``); may also be
            given to :meth:`result`.

    ``result()`` -> dict with ``available``, ``reason``, ``duration_s``, ``readings``,
    ``energy_source`` and the figures ``avg_power_w``, ``max_power_w``, ``energy_j``,
    ``energy_per_sample_j``, ``gpu_util_pct``, ``mem_util_pct`` (floats, or ``"n/a"``).
    The caller must synchronise the GPU before leaving the block, or the energy of work still
    queued is missed.
    """

    def __init__(self, device=None, interval_s: float = 0.02, num_samples: int | None = None):
        self.device = device
        self.interval_s = float(interval_s)
        self.num_samples = num_samples
        self._nv = None
        self._handle = None
        self._thread = None
        self._stop = threading.Event()
        self._power = []     # (time, watts)
        self._util = []      # (gpu %, mem %)
        self._energy0 = None
        self._energy1 = None
        self._t0 = self._t1 = None
        self.reason = ""

    # ------------------------------------------------------------------ NVML reads
    def _read_energy_mj(self):
        try:
            return float(self._nv.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

    def _sample_once(self):
        now = time.perf_counter()
        try:
            self._power.append((now, self._nv.nvmlDeviceGetPowerUsage(self._handle) / 1000.0))
        except Exception:
            pass
        try:
            u = self._nv.nvmlDeviceGetUtilizationRates(self._handle)
            self._util.append((float(u.gpu), float(u.memory)))
        except Exception:
            pass

    def _run(self):
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval_s)

    # ------------------------------------------------------------------ context manager
    def __enter__(self):
        try:
            self._nv = _nvml()
            self._handle = _handle_for(self._nv, self.device)
        except Exception as e:  # no pynvml, no libnvidia-ml, no driver, no such device
            self.reason = f"NVML unavailable: {type(e).__name__}: {e}".strip()
            self._shutdown()
            self._nv = None
        self._t0 = time.perf_counter()
        if self._nv is not None:
            self._energy0 = self._read_energy_mj()
            self._sample_once()
            self._thread = threading.Thread(target=self._run, name="PowerSampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._t1 = time.perf_counter()
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._nv is not None:
            self._energy1 = self._read_energy_mj()
            self._sample_once()
        self._shutdown()
        return False

    def _shutdown(self):
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass

    # ------------------------------------------------------------------ figures
    def result(self, num_samples: int | None = None) -> dict:
        """The telemetry of the finished block (see the class docstring)."""
        n = num_samples if num_samples is not None else self.num_samples
        dur = (self._t1 - self._t0) if (self._t0 is not None and self._t1 is not None) else None
        out = {"available": False, "reason": self.reason or "not run", "device": str(self.device),
               "duration_s": dur if dur is not None else NA, "readings": len(self._power),
               "interval_s": self.interval_s, "energy_source": NA}
        out.update({k: NA for k in _FIELDS})
        if self._nv is None or dur is None:
            return out
        energy = None
        if self._energy0 is not None and self._energy1 is not None and self._energy1 >= self._energy0:
            energy = (self._energy1 - self._energy0) / 1000.0
            out["energy_source"] = "counter"
        elif len(self._power) >= 2:
            pts = self._power
            energy = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
            out["energy_source"] = "power integral"
        if energy is not None and dur > 0:
            out["energy_j"] = energy
            out["avg_power_w"] = energy / dur
            if n:
                out["energy_per_sample_j"] = energy / n
        elif self._power:
            out["avg_power_w"] = sum(p for _, p in self._power) / len(self._power)
        if self._power:
            out["max_power_w"] = max(p for _, p in self._power)
        if self._util:
            out["gpu_util_pct"] = sum(u for u, _ in self._util) / len(self._util)
            out["mem_util_pct"] = sum(m for _, m in self._util) / len(self._util)
        out["available"] = out["avg_power_w"] != NA or out["gpu_util_pct"] != NA
        out["reason"] = "" if out["available"] else "NVML gave no power, energy or utilisation reading"
        return out
