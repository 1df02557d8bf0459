"""The GPU path measured in one short command (``make gpu-check``): CUDA tests, step and loss benchmarks, NCCL.

    python benchmarks/gpu_check.py                          # -> runs/gpu_check/<UTC time>/summary.{json,md}
    python benchmarks/gpu_check.py --budget 300 --only cuda-tests,bench-loss

The parts run one after another, each as its own subprocess under its own timeout (clipped to what is left of
``--budget`` seconds), so a hang costs only its part; a part that fails or times out is recorded and the next
one runs. Its output goes to ``<out>/<part>.log``.

=================  ======================================================================================
env                torch, CUDA, cuDNN, NCCL, the devices
cuda-tests         ``pytest -m cuda tests/test_cuda.py``: the CUDA path against the CPU (without CUDA: the
                   tests collect and skip, with their reason)
bench-step-*       ``bench_step.py`` at the paper's step (ResNet-50, 8 labeled + 8 pairs, crop 320): fp32,
                   bf16 (train.amp), channels_last, torch.compile; images/s and peak memory
bench-loss         ``bench_loss.py --devices cuda``: streamed kernel against the plain one, time and memory
nccl-2gpu          a 2-process NCCL torchrun training on a small synthetic set (needs two GPUs)
=================  ======================================================================================

Without CUDA it says so, runs the CPU parts at small sizes (under a minute on two cores) and exits 0 when they
pass, so CI can run it. With CUDA it exits 1 when any part failed or timed out. Everything it writes stays in
``--out`` (by default inside the repository): temporary files, compile and kernel caches and pytest's temporary
folders included. It installs nothing and imports no torch itself (the env part asks a child process).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(HERE))  # the summary writer beside this file

from gpu_check_report import nccl_result, pytest_result, write_summary  # noqa: E402

ENV_PROBE = r"""
import json, torch
cuda = torch.cuda.is_available()
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, "devices": []}
for i in range(info["device_count"]):
    p = torch.cuda.get_device_properties(i)
    info["devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}"})
print(json.dumps(info))
"""


@dataclass
class Part:
    name: str
    what: str
    argv: list
    timeout_s: float
    needs: str = "any"              # any | cpu (only without CUDA) | cuda | 2gpu
    result: Optional[Callable[[Path], object]] = None  # reads the part's result from its out dir


@dataclass
class Budget:
    total_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)


def _json_file(name):
    def read(out: Path):
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None
    return read


def parts(out: Path) -> list[Part]:
    """Every part, in the order they run; ``needs`` decides which run on this machine."""
    bench_step, bench_loss = str(HERE / "bench_step.py"), str(HERE / "bench_loss.py")
    pytest = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--basetemp", str(out / "pytest"),
              "--junitxml", str(out / "cuda-tests.xml"), "-m", "cuda", str(ROOT / "tests" / "test_cuda.py")]
    step = [PY, bench_step, "--warmup", "2", "--steps", "20"]
    nccl_dir = out / "nccl"
    nccl_sets = ["data.data_dir=" + str(nccl_dir / "data"), "data.synthetic_train=24", "data.synthetic_val=4",
                 "data.n_labeled=8", "data.crop_size=64", "data.base_size=80", "data.num_workers=0",
                 "data.val_max_images=2", "model.backbone=resnet18", "model.pretrained=null",
                 "loss.selected_num=64", "loss.epoch_start_unsup=0", "train.epochs=1", "train.iters_per_epoch=6",
                 "train.batch_size=4", "train.batch_size_unsup=4", "train.log_every=2",
                 "train.out_dir=" + str(nccl_dir / "runs"), "train.run_name=nccl"]
    return [
        Part("env", "torch, CUDA and the devices", [PY, "-c", ENV_PROBE], 60, result=None),
        Part("cuda-tests", "pytest -m cuda tests/test_cuda.py", pytest, 240,
             result=lambda o: pytest_result(o / "cuda-tests.xml")),
        Part("bench-loss-cpu", "bench_loss.py on the CPU, one small size (smoke)",
             [PY, bench_loss, "--devices", "cpu", "--sizes", "800x6400", "--scenarios", "uniform",
              "--repeats", "1", "--json", str(out / "bench-loss-cpu.json")], 90, "cpu",
             _json_file("bench-loss-cpu.json")),
        Part("bench-step-cpu", "bench_step.py on the CPU: synthetic ResNet-18, 2 + 2 pairs, crop 64 (smoke)",
             [PY, bench_step, "--preset", "synthetic", "--batch", "2", "--crop", "64", "--warmup", "1",
              "--steps", "1", "--json", str(out / "bench-step-cpu.json")], 90, "cpu",
             _json_file("bench-step-cpu.json")),
        Part("bench-step-fp32", "paper's step, fp32", step + ["--json", str(out / "bench-step-fp32.json")], 90,
             "cuda", _json_file("bench-step-fp32.json")),
        Part("bench-step-bf16", "paper's step, bf16 autocast (train.amp)",
             step + ["--amp", "--json", str(out / "bench-step-bf16.json")], 90, "cuda",
             _json_file("bench-step-bf16.json")),
        Part("bench-step-channels-last", "paper's step, channels_last (model.channels_last)",
             step + ["--channels-last", "--json", str(out / "bench-step-channels-last.json")], 90, "cuda",
             _json_file("bench-step-channels-last.json")),
        Part("bench-loss", "bench_loss.py on CUDA (3200x25600, 6400x51200; uniform, all-active)",
             [PY, bench_loss, "--devices", "cuda", "--repeats", "3", "--json", str(out / "bench-loss.json")],
             150, "cuda", _json_file("bench-loss.json")),
        Part("nccl-2gpu", "2-process NCCL torchrun training (synthetic, ResNet-18, 6 iterations)",
             [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cacnb.train",
              "--config", "synthetic", "--make-synthetic"] + [a for s in nccl_sets for a in ("--set", s)],
             150, "2gpu", lambda o: nccl_result(o / "nccl" / "runs" / "nccl")),
        Part("bench-step-compile", "paper's step, torch.compile (train.compile); first_step_s holds the compile",
             [PY, bench_step, "--compile", "--warmup", "3", "--steps", "20",
              "--json", str(out / "bench-step-compile.json")], 240, "cuda", _json_file("bench-step-compile.json")),
    ]


def child_env(out: Path) -> dict:
    """The parts' environment: the repository importable, every temporary file and cache inside ``out``."""
    env = dict(os.environ)
    cache = out / "cache"
    places = {"TMPDIR": out / "tmp", "TORCHINDUCTOR_CACHE_DIR": cache / "inductor",
              "TRITON_CACHE_DIR": cache / "triton", "CUDA_CACHE_PATH": cache / "nv", "MPLCONFIGDIR": cache / "mpl",
              "XDG_CACHE_HOME": cache / "xdg", "TORCH_HOME": cache / "torch"}
    for key, path in places.items():
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", CACNB_TQDM_INTERVAL="30")
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's whole process group (its benchmark workers, torchrun's ranks), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, out: Path, env: dict, timeout_s: float) -> dict:
    """Run one part in its own session; never raises for the part's own failure or hang."""
    log = out / f"{part.name}.log"
    tic = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(map(str, part.argv))}\n")
        f.flush()
        try:
            proc = subprocess.Popen(part.argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
        except OSError as e:
            return _record(part, "failed", None, 0.0, timeout_s, log, error=str(e))
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            rc, status = None, "timeout"
        except BaseException:   # Ctrl-C: take the part's processes down with us
            _stop_group(proc)
            raise
    record = _record(part, status, rc, time.monotonic() - tic, timeout_s, log)
    try:
        record["result"] = part.result(out) if part.result else None
    except Exception as e:  # a result that cannot be read is reported, not fatal
        record["result"] = None
        record["result_error"] = f"{type(e).__name__}: {e}"
    return record


def _record(part, status, rc, seconds, timeout_s, log, error=None) -> dict:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    rec = {"name": part.name, "what": part.what, "status": status, "rc": rc, "seconds": round(seconds, 1),
           "timeout_s": round(timeout_s, 1), "log": log.name, "tail": lines[-15:]}
    if error:
        rec["error"] = error
    return rec


def skipped(part: Part, reason: str) -> dict:
    return {"name": part.name, "what": part.what, "status": "skipped", "reason": reason}


def probe_env(out: Path, env: dict, budget: Budget) -> dict:
    """The env part, whose JSON line decides which parts can run."""
    record = run_part(parts(out)[0], out, env, min(60.0, max(budget.left(), 1.0)))
    info = None
    for line in reversed(record["tail"]):
        if line.startswith("{"):
            info = json.loads(line)
            break
    record["result"] = info
    return record


def why_not(part: Part, info: Optional[dict]) -> Optional[str]:
    cuda = bool(info and info.get("cuda"))
    if part.needs == "cpu" and cuda:
        return "CPU smoke part: CUDA is available, the CUDA parts measure instead"
    if part.needs in ("cuda", "2gpu") and not cuda:
        return "CUDA not available (torch.cuda.is_available() is False)"
    if part.needs == "2gpu" and info["device_count"] < 2:
        return f"needs 2 GPUs, this machine has {info['device_count']}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / stamp), help="folder for logs and summary")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together (default 450)")
    p.add_argument("--only", default=None, help="comma-separated part names to run (env always runs)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget, env = Budget(args.budget), child_env(out)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env_record = probe_env(out, env, budget)
    info = env_record["result"]
    print(_env_line(info), flush=True)
    only = set(args.only.split(",")) if args.only else None
    records = [env_record]
    for part in parts(out)[1:]:
        reason = "not in --only" if only is not None and part.name not in only else why_not(part, info)
        left = budget.left() - 5.0
        if reason is None and left < 20.0:
            reason = f"budget: {budget.left():.0f} s of {args.budget:.0f} s left"
        if reason:
            records.append(skipped(part, reason))
        else:
            print(f"[gpu-check] {part.name}: {part.what} (timeout {min(part.timeout_s, left):.0f} s)", flush=True)
            records.append(run_part(part, out, env, min(part.timeout_s, left)))
        _report(records[-1])
    summary = {"started": started, "seconds": round(time.monotonic() - budget.start, 1), "budget_s": args.budget,
               "cuda": bool(info and info.get("cuda")), "env": info, "parts": records}
    write_summary(out, summary)
    print(f"[gpu-check] summary: {out / 'summary.md'} and {out / 'summary.json'}", flush=True)
    return 1 if any(r["status"] in ("failed", "timeout") for r in records) else 0


def _env_line(info: Optional[dict]) -> str:
    if info is None:
        return "[gpu-check] env: the torch probe failed (see env.log); only parts without CUDA can run"
    if not info["cuda"]:
        return (f"[gpu-check] torch {info['torch']}: CUDA not available (torch.cuda.is_available() is False); "
                "running the CPU parts only, the CUDA parts are reported as skipped")
    names = ", ".join(d["name"] for d in info["devices"])
    return f"[gpu-check] torch {info['torch']}, CUDA {info['cuda_build']}, {info['device_count']} GPU(s): {names}"


def _report(record: dict) -> None:
    extra = record.get("reason") or f"{record.get('seconds', 0):.0f} s, rc {record.get('rc')}"
    print(f"[gpu-check] {record['name']}: {record['status']} ({extra})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
