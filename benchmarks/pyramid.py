"""Benchmark: building the multi-resolution pyramid, shard by shard vs load-everything.

    python -m benchmarks.pyramid [--num 50000] [--resolution 32] [--shard-size 4096]

Writes a synthetic prepared dataset (uint8 noise, not timed), then builds its pyramid
down to ``--coarsest`` with two implementations, each in a fresh subprocess so that its
peak resident memory (VmHWM of that process) is its own:

- ``baseline``: the straightforward way: load every shard of a split, concatenate, pool
  each level with ``reshape(...).mean()`` (float64), write the levels out in shards.
- ``sharded``: ``cfebm.data.build_pyramid``: one shard at a time, float32 exact pooling.

Both write identical files (checked), so the comparison is like for like. A third
subprocess that only imports the same modules gives the interpreter's own footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("baseline", "sharded")


def write_synthetic(url: str, num: int, resolution: int, channels: int, shard_size: int) -> None:
    """A prepared dataset (finest level only) of ``num`` random uint8 images."""
    from cfebm.data import layout
    from cfebm.data.pyramid import level_info
    from cfebm.data.writer import DatasetWriter, ShardBuffer

    rng = np.random.default_rng(0)
    with DatasetWriter(url) as writer:
        buffer = ShardBuffer(writer, "train", resolution, shard_size)
        for start in range(0, num, shard_size):
            n = min(shard_size, num - start)
            images = rng.integers(0, 256, (n, channels, resolution, resolution), dtype=np.uint8)
            buffer.add(images, rng.integers(0, 10, n))
        counts = buffer.close()
        writer.commit(
            {
                "format": layout.FORMAT,
                "source": {"source": "synthetic", "num": num, "seed": 0},
                "channels": channels,
                "resolutions": [resolution],
                "splits": {"train": {"count": num, "shards": len(counts), "shard_counts": counts}},
                "shard_size": shard_size,
                "has_labels": True,
                "label_names": [str(i) for i in range(10)],
                "label_fields": None,
                "levels": level_info([resolution], channels),
                "skipped": [],
                "skipped_count": 0,
            }
        )


def build_baseline(input_url: str, out_url: str, coarsest: int) -> None:
    """Load each split whole, pool it level by level in float64, then write it in shards."""
    from cfebm.data import PyramidStore, layout
    from cfebm.data.pyramid import level_info
    from cfebm.data.writer import DatasetWriter

    source = PyramidStore(input_url)
    finest = source.resolutions[-1]
    resolutions = layout.pyramid_resolutions(finest, coarsest)
    with DatasetWriter(out_url) as writer:
        for split in source.splits:
            paths = source.shard_urls(split, finest)
            images = np.concatenate([np.load(p) for p in paths])  # [N, C, r, r], all of it
            labels = source.labels(split)
            levels = {finest: images}
            x = images
            for r in reversed(resolutions[:-1]):
                n, c, h, w = x.shape
                x = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
                levels[r] = x
            bounds = np.cumsum([0, *source.shard_counts(split)])
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                for r, level in levels.items():
                    dtype = layout.level_dtype(r, finest)
                    writer.write_array(layout.images_path(split, r, k), level[lo:hi].astype(dtype))
                writer.write_array(layout.labels_path(split, k), labels[lo:hi])
        manifest = {k: v for k, v in source.manifest.items() if k != "files"}
        manifest.update(resolutions=resolutions, levels=level_info(resolutions, source.channels))
        manifest["pyramid"] = {"input": input_url, "out": out_url, "coarsest": coarsest}
        writer.commit(manifest)


def build_sharded(input_url: str, out_url: str, coarsest: int) -> None:
    from cfebm.data import PyramidConfig, build_pyramid

    build_pyramid(PyramidConfig(input=input_url, out=out_url, coarsest=coarsest))


def run_variant(variant: str, input_url: str, out_url: str, coarsest: int) -> dict:
    """Child process: time one variant (or only import, for 'idle') and report peak RSS."""
    import cfebm.data  # noqa: F401  (imported by every variant, so 'idle' is a fair floor)
    import cfebm.data.writer  # noqa: F401

    start = time.perf_counter()
    if variant == "baseline":
        build_baseline(input_url, out_url, coarsest)
    elif variant == "sharded":
        build_sharded(input_url, out_url, coarsest)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak_rss_kib() / 1024}


def peak_rss_kib() -> int:
    """Peak resident memory of this process's own address space, in KiB.

    Linux's VmHWM, not ``ru_maxrss``: the kernel carries ``ru_maxrss`` across exec, so a
    child started by (v)fork inherits its parent's peak and every variant would read at
    least the parent's footprint. ``ru_maxrss`` is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def spawn(variant: str, input_url: str, out_url: str, coarsest: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.pyramid", "--variant", variant]
    cmd += ["--input", input_url, "--out", out_url, "--coarsest", str(coarsest)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(num: int, results: dict[str, dict], idle: dict) -> str:
    rows = ["| variant | seconds | images/s | peak RSS (MiB) | RSS above import (MiB) |"]
    rows.append("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['seconds']:.2f} | {num / r['seconds']:,.0f} | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] - idle['peak_mib']:.0f} |"
        )
    b, s = results["baseline"], results["sharded"]
    extra_b, extra_s = b["peak_mib"] - idle["peak_mib"], max(s["peak_mib"] - idle["peak_mib"], 1)
    rows.append(
        f"| sharded vs baseline | {b['seconds'] / s['seconds']:.2f}x faster | | "
        f"{b['peak_mib'] / s['peak_mib']:.2f}x less | {extra_b / extra_s:.1f}x less |"
    )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pyramid", description=__doc__)
    p.add_argument("--num", type=int, default=50_000, help="images (default 50000)")
    p.add_argument("--resolution", type=int, default=32, help="finest resolution (default 32)")
    p.add_argument("--channels", type=int, default=3, help="channels (default 3)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    p.add_argument("--coarsest", type=int, default=4, help="coarsest resolution (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant, best time kept")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--variant", choices=(*VARIANTS, "idle"), help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, and return the measurements."""
    args = parse_args(argv)
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.input, args.out, args.coarsest)))
        return {}
    workdir = args.workdir or tempfile.mkdtemp(prefix="cfebm-bench-")
    try:
        prepared = os.path.join(workdir, "prepared")
        write_synthetic(prepared, args.num, args.resolution, args.channels, args.shard_size)
        idle = spawn("idle", prepared, "", args.coarsest)
        results = {}
        for variant in VARIANTS:
            runs = [
                spawn(variant, prepared, os.path.join(workdir, variant), args.coarsest)
                for _ in range(args.repeat)
            ]
            best = min(runs, key=lambda r: r["seconds"])
            results[variant] = {**best, "peak_mib": max(r["peak_mib"] for r in runs)}
        same = _files(os.path.join(workdir, "baseline")) == _files(os.path.join(workdir, "sharded"))
        if not same:
            raise RuntimeError("baseline and sharded pyramids differ")
        shape = f"{args.num} images {args.channels}x{args.resolution}x{args.resolution}"
        print(f"pyramid {args.resolution} -> {args.coarsest}, {shape}, shards of {args.shard_size}")
        print(table(args.num, results, idle))
        print(f"(interpreter + imports alone: {idle['peak_mib']:.0f} MiB; outputs identical)")
        return {"num": args.num, "idle": idle, **results}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _files(root: str) -> dict[str, str]:
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)["files"]


if __name__ == "__main__":
    main()
