"""``make run``: the pipeline with ``dvc repro``, on the default data or a preset.

    python -m pipelines.run [--preset cifar10 --data ARCHIVE] [--] [dvc repro options]

Without a preset, runs ``params.yaml`` as it is. With ``--preset NAME``, first lays
``presets/NAME.yaml`` over the repository's default settings and writes the result to
``params.yaml`` (``--data`` sets ``prepare.url``), so that DVC records what ran; plain
``make run`` afterwards warns that params.yaml holds a preset, and ``git checkout
params.yaml`` brings the default back. A params.yaml with edits of your own is never
overwritten. The default targets are the pipeline's results (evaluate, restore, ood,
translate) and whatever they need; the ``tune`` search runs only when training uses its
result (``train.sampler_from_tune: tune/best.json``) or when asked (``dvc repro tune``).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys

import yaml

from pipelines import _cli

PRESETS = "presets"
PARAMS = "params.yaml"
TARGETS = ("evaluate", "restore", "ood", "translate")
MARK = "# cfebm preset: "
WHOLE = ("batch_size", "lr", "images", "replay", "stages", "other")
"""Keys whose value a preset replaces whole (tables keyed by resolution, lists)."""


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in WHOLE:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def committed_params() -> str | None:
    """params.yaml as the repository has it (None outside a git checkout)."""
    done = subprocess.run(["git", "show", f"HEAD:{PARAMS}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def apply_preset(name: str, data: str | None) -> str:
    """Write params.yaml = the default settings + presets/<name>.yaml; its first line."""
    path = os.path.join(PRESETS, f"{name}.yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml"))
        sys.exit(f"run: error: no preset {name!r}; presets: {', '.join(known)}")
    with open(PARAMS) as f:
        current = f.read()
    base = committed_params()
    if base is not None and current != base and not current.startswith(MARK):
        sys.exit(
            f"run: error: {PARAMS} has changes of your own; commit or stash them first "
            "(a preset rewrites it)"
        )
    with open(path) as f:
        preset = yaml.safe_load(f) or {}
    params = merge(yaml.safe_load(base if base is not None else current) or {}, preset)
    if preset.get("prepare", {}).get("source") in ("cifar10", "folder") and not (
        data or preset["prepare"].get("url")
    ):
        sys.exit(f"run: error: preset {name!r} reads your data: give DATA=<path or URL>")
    if data:
        params.setdefault("prepare", {})["url"] = data
    header = f"{MARK}{name}" + (f" (data: {data})" if data else "") + "\n"
    body = yaml.safe_dump(params, sort_keys=False)
    with open(PARAMS, "w") as f:
        f.write(
            header
            + "# written by `make run PRESET=...`; `git checkout params.yaml` for the default\n"
            + body
        )
    return header.strip()


def overlay_params(overlays: list[str], sets: list[str], log=print) -> None:
    """Rewrite params.yaml: each YAML file of ``overlays`` laid over it in turn (as a preset
    is, :func:`merge`), then each ``KEY=VALUE`` of ``sets`` (a dotted key, a YAML value).
    For throwaway copies of the project (a cluster job's working directory)."""
    with open(PARAMS) as f:
        params = yaml.safe_load(f) or {}
    for path in overlays:
        if not os.path.exists(path):
            sys.exit(f"run: error: no params overlay {path}")
        with open(path) as f:
            params = merge(params, yaml.safe_load(f) or {})
        log(f"run: {PARAMS} <- {path}")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"run: error: --set wants KEY=VALUE, got {item!r}")
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
        log(f"run: {key} = {node[last]!r}")
    with open(PARAMS, "w") as f:
        yaml.safe_dump(params, f, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.run", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--preset", help="presets/<PRESET>.yaml over the default settings")
    p.add_argument("--data", help="the preset's data: prepare.url (a path or fsspec URL)")
    p.add_argument("--overlay", action="append", default=[], help="YAML laid over params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    p.add_argument(
        "--params-only", action="store_true", help="write params.yaml (overlays, sets), no run"
    )
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if args.overlay or args.sets or args.params_only:
        if args.preset or args.data:
            sys.exit("run: error: --overlay/--set are for job copies; not with a preset")
        overlay_params(args.overlay, args.sets)
        if args.params_only:
            return 0
    if args.preset:
        print(f"run: {apply_preset(args.preset, args.data)}", flush=True)
    elif args.data:
        sys.exit("run: error: DATA goes with a PRESET (or set prepare.url in params.yaml)")
    else:
        with open(PARAMS) as f:
            first = f.readline()
        if first.startswith(MARK):
            print(f"run: note: {PARAMS} holds {first[len(MARK):].strip()}; "
                  f"`git checkout {PARAMS}` for the default", flush=True)  # fmt: skip
    targets = [a for a in rest if not a.startswith("-")] or list(TARGETS)
    options = [a for a in rest if a.startswith("-")]
    if not os.environ.get("RAY_ADDRESS"):
        # One local Ray for the whole pipeline, owned by this process: each training stage
        # joins it instead of starting (and stopping) a Ray of its own (~12 s a stage).
        from pipelines import ray_utils

        print(f"run: {ray_utils.connect(None, None)}", flush=True)
    return subprocess.call(["dvc", "repro", *options, *targets])


if __name__ == "__main__":
    _cli.script(main)
