"""Ratios against floors and peers, measured in the same run on the same files.

- series read (``read_series(scan())``) vs ``cat`` of every file (warm cache) and vs ``dcm2niix``;
- reformat + write: ``sprim run --step reformat.mpr`` (axial, 2 mm slabs every 2 mm, 2 mm
  pixels, written as DICOM) vs ``plastimatch convert --spacing "2 2 2" --dim ...`` writing the
  equivalent 2 mm resampled DICOM series;
- receive: ``sprim listen`` vs dcmtk ``storescp``, the same files sent by ``storescu``.

Each measured thing is a fresh process (peak RSS per stage); median of ``--runs``.
Writes ``bench/results/peers.json``.

Run: ``.venv/bin/python -m bench.bench_peers [--quick] [--slices 400] [--runs 3]``
"""

from __future__ import annotations

import argparse
import math
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BIN,
    REAL_CT,
    cat_floor,
    command_line,
    env,
    print_result,
    repeat,
    row,
    run_cmd,
    run_python,
    series_mb,
    synthetic_series,
    write_result,
)

READ = """
import json, sys, time
from workers.reading.series import read_series, scan
t0 = time.perf_counter()
img = read_series(scan(sys.argv[1])[0]).volume.image
print(json.dumps({"seconds": time.perf_counter() - t0, "size": list(img.GetSize()),
                  "pixel": img.GetPixelIDTypeAsString()}))
"""
IMPORTS = "import json; from workers.reading.series import read_series, scan; print('{}')"
MPR2 = """
import json, sys, tempfile, time
from pathlib import Path
from workers.processing.offline import parse_sets
from workers.processing.runner import run_steps
from workers.reading.series import read_series, scan
import workers.writers.derived_series  # noqa: F401  (imports excluded from the timing)
calls = parse_sets(["reformat.mpr"], ["planes=[axial]", "thickness_mm=2", "spacing_mm=2",
                                      "pixel_spacing_mm=2"])
with tempfile.TemporaryDirectory(prefix="sprim-bench-mpr2-") as d:
    t0 = time.perf_counter()
    rep = run_steps(read_series(scan(Path(sys.argv[1]))[0]), calls, "cli", Path(d))
    dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "files": len(rep.written)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout:.0f} s")


def read_vs_peers(folder: Path, runs: int, label: str) -> dict[str, Any]:
    """cat floor, sprim read and dcm2niix on ``folder``."""
    out: dict[str, Any] = {"series": label, "series_mb": round(series_mb(folder), 1)}
    out["cat"] = cat_floor(folder, runs).to_dict()
    stat, samples = repeat(lambda: run_python(READ, str(folder)), runs, key="seconds")
    out["read"] = stat.to_dict() | {"volume": samples[0].inner}
    out["import_only_rss_mb"] = round(run_python(IMPORTS).max_rss_mb, 1)
    if shutil.which("dcm2niix"):
        with tempfile.TemporaryDirectory(prefix="sprim-bench-nii-") as tmp:
            cmd = ["dcm2niix", "-z", "n", "-o", tmp, str(folder)]

            def clean() -> None:
                for f in Path(tmp).iterdir():
                    f.unlink()

            out["dcm2niix"] = repeat(lambda: run_cmd(cmd), runs, setup=clean)[0].to_dict()
    return out


def _plastimatch_dims(folder: Path, spacing: float) -> tuple[list[int], str]:
    """Output grid of plastimatch covering the source extent at ``spacing`` mm."""
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    last = pydicom.dcmread(files[-1], stop_before_pixels=True)
    px = [float(v) for v in ds.PixelSpacing]
    z = abs(float(last.ImagePositionPatient[2]) - float(ds.ImagePositionPatient[2]))
    dims = [
        math.floor(ds.Columns * px[1] / spacing),
        math.floor(ds.Rows * px[0] / spacing),
        math.floor((z + float(ds.get("SliceThickness", 1) or 1)) / spacing),
    ]
    return dims, " ".join(map(str, dims))


def reformat_vs_plastimatch(folder: Path, runs: int) -> dict[str, Any]:
    """sprim read + axial 2 mm reformat + DICOM write vs plastimatch resample + DICOM write."""
    out: dict[str, Any] = {}
    dims, dim_arg = _plastimatch_dims(folder, 2.0)
    with tempfile.TemporaryDirectory(prefix="sprim-bench-mpr2-") as tmp:
        dest = Path(tmp) / "out"

        def clean() -> None:
            shutil.rmtree(dest, ignore_errors=True)

        sprim = [
            str(BIN / "sprim"), "run", str(folder), "--out", str(dest), "--step", "reformat.mpr",
            "--set", "planes=[axial]", "--set", "thickness_mm=2", "--set", "spacing_mm=2",
            "--set", "pixel_spacing_mm=2",
        ]  # fmt: skip
        pm = ["plastimatch", "convert", "--input", str(folder), "--output-dicom", str(dest),
              "--spacing", "2 2 2", "--dim", dim_arg]  # fmt: skip
        have_pm = shutil.which("plastimatch") is not None
        # Alternate sprim and plastimatch run by run: on a shared machine the load changes
        # between runs, and each pair sees about the same load (the pair ratios are reported).
        got: dict[str, list] = {"sprim": [], "plastimatch": []}
        files: dict[str, int] = {}
        try:
            for _ in range(max(1, runs)):
                for name, cmd in (("sprim", sprim), ("plastimatch", pm)):
                    if name == "plastimatch" and not have_pm:
                        continue
                    clean()
                    got[name].append(run_cmd(cmd))
                    files[name] = len(list(dest.rglob("*.dcm")))
        except RuntimeError as e:
            out["sprim"] = {"error": str(e).splitlines()[-1][:300]}
            return out
        for name, samples in got.items():
            if not samples:
                continue
            walls, cpus = [x.seconds for x in samples], [x.cpu_s for x in samples]
            out[name] = {
                "median": statistics.median(walls), "min": min(walls), "max": max(walls),
                "runs": [round(x, 3) for x in walls], "cpu_median": statistics.median(cpus),
                "cpu_runs": [round(x, 3) for x in cpus],
                "max_rss_mb": max(x.max_rss_mb for x in samples), "files": files[name],
            }  # fmt: skip
        out["sprim"]["command"] = " ".join(sprim[1:])
        if got["plastimatch"]:
            out["pair_ratios"] = [round(a.seconds / b.seconds, 3) for a, b in
                                  zip(got["sprim"], got["plastimatch"], strict=True)]  # fmt: skip
            out["plastimatch"] |= {
                "command": f'plastimatch convert --input DIR --output-dicom OUT --spacing "2 2 2" '
                f'--dim "{dim_arg}"',
                "dims": dims,
            }
        try:
            stat, _ = repeat(lambda: run_python(MPR2, str(folder)), runs, key="seconds")
            out["sprim_inprocess"] = stat.to_dict()
        except RuntimeError as e:
            out["sprim_inprocess"] = {"error": str(e).splitlines()[-1][:300]}
    return out


def receive_vs_storescp(folder: Path, runs: int) -> dict[str, Any]:
    """``storescu`` of the series to ``storescp`` (stores files) and to ``sprim listen``."""
    if not (shutil.which("storescu") and shutil.which("storescp")):
        return {"error": "dcmtk not installed"}
    files = sorted(str(f) for f in folder.glob("*.dcm"))
    out: dict[str, Any] = {"files": len(files)}
    with tempfile.TemporaryDirectory(prefix="sprim-bench-recv-") as tmp:
        for name in ("storescp", "sprim_listen"):
            port = _free_port()
            store = Path(tmp) / name
            store.mkdir()
            home = Path(tmp) / f"home-{name}"
            if name == "storescp":
                server = ["storescp", "-aet", "STORESCP", "-od", str(store), str(port)]
            else:
                server = [str(BIN / "sprim"), "listen", "--port", str(port), "--host",
                          "127.0.0.1", "--aet", "SPRIM", "--store", str(store),
                          "--quiet", "3600"]  # fmt: skip
            proc = subprocess.Popen(
                server,
                env=env(SPRIM_HOME=str(home)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_port(port, proc)
                send = ["storescu", "-aec", "STORESCP" if name == "storescp" else "SPRIM",
                        "-aet", "BENCH", "-nh", "127.0.0.1", str(port), *files]  # fmt: skip

                def clean(store: Path = store) -> None:
                    for p in list(store.iterdir()):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()

                stat, _ = repeat(lambda send=send: run_cmd(send), runs, setup=clean)
                received = sum(1 for p in store.rglob("*") if p.is_file())
                out[name] = stat.to_dict() | {"received_files": received}
            except (RuntimeError, TimeoutError) as e:
                out[name] = {"error": str(e).splitlines()[0][:300]}
            finally:
                proc.terminate()
                try:
                    _, _, usage = os_wait4(proc)
                    if isinstance(out.get(name), dict):
                        out[name]["server_max_rss_mb"] = round(usage / 1024.0, 1)
                except Exception:  # noqa: BLE001
                    proc.kill()
    return out


def os_wait4(proc: subprocess.Popen, timeout: float = 15.0) -> tuple[int, int, int]:
    """Reap ``proc`` (after terminate) with wait4; returns (pid, status, ru_maxrss KiB)."""
    import os

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage.ru_maxrss
        time.sleep(0.05)
    proc.kill()
    pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return pid, status, usage.ru_maxrss


def _ratio(a: dict | None, b: dict | None, key: str = "median") -> float | None:
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def _rows(raw: dict[str, Any], cmd: str) -> list[dict]:
    rows = []
    for rd in raw["read"]:
        tag = rd["series"]
        r, c, d = rd.get("read"), rd.get("cat"), rd.get("dcm2niix")
        rows.append(row(f"peers.read_vs_cat.{tag}", f"series read vs `cat` floor ({tag})",
                        _ratio(r, c), "x", target=6.0,
                        detail=f"read {r['median']:.3f} s, {r['max_rss_mb']:.0f} MB; "
                        f"cat {c['median']:.3f} s", command=cmd))  # fmt: skip
        if d:
            rows.append(row(f"peers.read_vs_dcm2niix.{tag}", f"series read vs dcm2niix ({tag})",
                            _ratio(r, d), "x", detail=f"dcm2niix {d['median']:.3f} s, "
                            f"{d['max_rss_mb']:.0f} MB", command=cmd))  # fmt: skip
        if tag.startswith("synthetic-400"):
            rows.append(row("issue2.read_s", "series read, 400 x 512² (issue 2)", r["median"],
                            "s", target=1.0, detail=f"min {r['min']:.3f}, max {r['max']:.3f}",
                            command=cmd))  # fmt: skip
            rows.append(row("issue2.read_rss_mb", "series read peak RSS (issue 2)",
                            r["max_rss_mb"], "MB", target=600.0,
                            detail=f"python + imports alone: {rd['import_only_rss_mb']:.0f} MB",
                            command=cmd))  # fmt: skip
    for tag, rp in raw["reformat"].items():
        s, p = rp.get("sprim", {}), rp.get("plastimatch", {})
        pairs = rp.get("pair_ratios")
        ratio = statistics.median(pairs) if pairs else _ratio(s, p)
        detail = (
            f"median of {len(pairs or [])} alternated runs' ratios {pairs}; sprim "
            f"{s['median']:.2f} s, {s.get('cpu_median', 0):.2f} s CPU, "
            f"{s['max_rss_mb']:.0f} MB ({s['files']} files); plastimatch {p['median']:.2f} s, "
            f"{p.get('cpu_median', 0):.2f} s CPU, {p['max_rss_mb']:.0f} MB ({p['files']} files); "
            f"CPU ratio {_ratio(s, p, 'cpu_median') or 0:.2f}x"
            if ratio is not None
            else f"not measured: {s.get('error') or p.get('error') or 'plastimatch missing'}"
        )
        ip = rp.get("sprim_inprocess", {})
        if ratio is not None and "median" in ip:
            detail += (f"; in one warm process (imports excluded) sprim {ip['median']:.2f} s = "
                       f"{ip['median'] / p['median']:.2f}x")  # fmt: skip
        rows.append(row(f"peers.reformat_vs_plastimatch.{tag}",
                        f"read + 2 mm axial reformat + DICOM write vs plastimatch, cold "
                        f"processes ({tag})", ratio, "x", target=0.8, detail=detail,
                        command=cmd))  # fmt: skip
    st = raw.get("startup")
    if st:
        rows.append(row("peers.startup", "start-up: python + import of the sprim CLI "
                        "(tasks.main)", st["median"], "s", detail=f"min {st['min']:.2f}, max "
                        f"{st['max']:.2f}, {st['max_rss_mb']:.0f} MB; paid by every `sprim run`",
                        command=cmd))  # fmt: skip
    if "receive" not in raw:
        return rows
    rv = raw["receive"]
    s, d = rv.get("sprim_listen", {}), rv.get("storescp", {})
    ratio = _ratio(s, d)
    detail = (
        f"{rv['files']} files: sprim listen {s['median']:.2f} s, storescp {d['median']:.2f} s"
        if ratio is not None
        else f"not measured: {s.get('error') or d.get('error') or rv.get('error')}"
    )
    rows.append(row("peers.receive_vs_storescp", "`sprim listen` receive vs dcmtk storescp",
                    ratio, "x", target=2.0, detail=detail, command=cmd))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 slices, 1 run (debugging).")
    ap.add_argument("--slices", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["read", "reformat", "receive"])
    args = ap.parse_args()
    n = args.slices or (100 if args.quick else 400)
    runs = args.runs or (1 if args.quick else 3)
    synth = synthetic_series(n)
    sets = {f"synthetic-{n}": synth}
    if REAL_CT.is_dir():
        sets["real-ct-134"] = REAL_CT
    raw: dict[str, Any] = {"slices": n, "runs": runs, "read": [], "reformat": {}}
    if "read" not in args.skip:
        for tag, folder in sets.items():
            raw["read"].append(read_vs_peers(folder, runs, tag))
    if "reformat" not in args.skip:
        code = "import tasks.main"  # what `sprim` imports before parsing its arguments
        raw["startup"] = repeat(lambda: run_python(code), runs)[0].to_dict()
        for tag, folder in sets.items():
            raw["reformat"][tag] = reformat_vs_plastimatch(folder, runs)
    if "receive" not in args.skip:
        raw["receive"] = receive_vs_storescp(synth, runs)
    cmd = command_line("bench.bench_peers")
    print_result(write_result("peers", _rows(raw, cmd), raw, cmd))


if __name__ == "__main__":
    main()
